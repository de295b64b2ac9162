"""The path layer (fsutil) for the toy data builders and `load_hf`: local paths, and the
object-store branch reached through the same code.

There is no object store here. `fake_gs` registers a test double as epath's backend for `gs://`
URLs: objects live under a local folder, `rename`/`replace` fail (an object store has none, so
any code relying on them for gs:// would fail here), and every call is logged. The code under
test sees real `gs://...` strings, so `fsutil.is_remote` and every other branch decide exactly as
they would on GCS.
"""
import filecmp
import os
import shutil

import jax
import numpy as np
import pytest
from etils.epath import backend as epath_backend
from etils.epath import gpath
from tiny import save_tiny_embedder_dir

import embedrl_jax
from embedrl_jax import fsutil
from embedrl_jax.data.inputs import load_image_processor, load_tokenizer
from embedrl_jax.data.toy import make_toy_retrieval
from embedrl_jax.data.toy_rl import make_toy_keywords
from embedrl_jax.errors import MissingFileError
from embedrl_jax.eval.toy_set import make_toy_eval_set
from embedrl_jax.safetensors_io import INDEX_NAME
from embedrl_jax.sharding import to_host

RL_ARGS = dict(embedder_pairs=4, rl_pairs=4, sft_samples=4, heldout_pairs=4)


class FakeObjectStore(epath_backend._OsPathBackend):
    """gs://BUCKET/KEY stored at ROOT/BUCKET/KEY; no rename; every call logged as (op, url, mode)."""

    def __init__(self, root):
        self.root, self.log = str(root), []

    def _local(self, path, op=None, mode=""):
        s = os.fspath(path)
        if s.startswith("gs://"):
            if op:
                self.log.append((op, s, mode))
            return os.path.join(self.root, s[len("gs://"):])
        return s

    def _url(self, local):
        return "gs://" + os.path.relpath(os.fspath(local), self.root)

    def open(self, path, mode):
        return super().open(self._local(path, "open", mode), mode)

    def exists(self, path):
        return super().exists(self._local(path))

    def isdir(self, path):
        return super().isdir(self._local(path))

    def listdir(self, path):
        return super().listdir(self._local(path))

    def glob(self, path):
        return [self._url(p) for p in super().glob(self._local(path))]

    def walk(self, top, *, top_down=True, on_error=None):
        for d, dirs, files in super().walk(self._local(top), top_down=top_down, on_error=on_error):
            yield self._url(d), dirs, files

    def makedirs(self, path, *, exist_ok=False, mode=None):
        return super().makedirs(self._local(path), exist_ok=exist_ok)

    def mkdir(self, path, *, exist_ok=False, mode=None):
        return super().mkdir(self._local(path), exist_ok=exist_ok)

    def rmtree(self, path):
        return super().rmtree(self._local(path, "rmtree"))

    def remove(self, path):
        return super().remove(self._local(path, "remove"))

    def rename(self, path, dst):
        raise AssertionError(f"rename {path} -> {dst}: an object store has no rename")

    def replace(self, path, dst):
        raise AssertionError(f"replace {path} -> {dst}: an object store has no rename")

    def copy(self, path, dst, overwrite):
        return super().copy(self._local(path, "read"), self._local(dst, "write"), overwrite=overwrite)

    def stat(self, path):
        return super().stat(self._local(path))

    def writes(self, prefix=""):
        return [url for op, url, mode in self.log
                if url.startswith(prefix) and (op == "write" or (op == "open" and "w" in mode))]


@pytest.fixture
def fake_gs(tmp_path, monkeypatch):
    store = FakeObjectStore(tmp_path / "objects")
    os.makedirs(os.path.join(store.root, "bucket"))
    monkeypatch.setitem(gpath._PREFIX_TO_BACKEND, "gs", store)
    monkeypatch.setattr(gpath, "_GCS_BACKENDS", gpath._GCS_BACKENDS | {store})  # local <-> gs copies go through it
    monkeypatch.setenv("EMBEDRL_CACHE", str(tmp_path / "cache"))
    return store


def _same_tree(a, b):
    """Same file names and bytes under two local folders (the commit marker aside)."""
    names = lambda root: sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs
                                if f != fsutil.COMMIT_MARKER)
    assert names(a) == names(b) and names(a)
    _, mismatch, errors = filecmp.cmpfiles(a, b, names(a), shallow=False)
    assert not mismatch and not errors, (mismatch, errors)


def test_toy_sets_publish_to_an_object_store_with_the_marker_last(fake_gs, tmp_path):
    bucket = os.path.join(fake_gs.root, "bucket")
    m = make_toy_keywords("gs://bucket/rl", **RL_ARGS)
    local = make_toy_keywords(tmp_path / "rl", **RL_ARGS)
    _same_tree(os.path.join(bucket, "rl"), tmp_path / "rl")
    writes = fake_gs.writes("gs://bucket/rl/")
    assert writes[-1] == f"gs://bucket/rl/{fsutil.COMMIT_MARKER}" and len(writes) == 8  # 6 files, manifest, marker
    # the manifest's paths are local files (the readers' and PIL's need): a copy under the cache
    assert m["dir"].startswith(str(tmp_path / "cache")) and os.path.isfile(m["files"]["rl_train"])
    assert {k: os.path.basename(v) for k, v in m["files"].items()} == \
        {k: os.path.basename(v) for k, v in local["files"].items()}
    _same_tree(m["dir"], tmp_path / "rl")
    # reused: nothing written to the store again, and the local copy is not refreshed either
    n_log = len(fake_gs.log)
    assert make_toy_keywords("gs://bucket/rl", **RL_ARGS) == m
    assert [op for op, _, mode in fake_gs.log[n_log:]] == ["open"] * 2  # the manifest and the commit marker, read
    with pytest.raises(ValueError, match="gs://bucket/rl holds a toy keyword task built with"):
        make_toy_keywords("gs://bucket/rl", **dict(RL_ARGS, rl_pairs=5))

    # a torn upload (files there, no marker) of the same set is rebuilt; the local copy follows
    os.remove(os.path.join(bucket, "rl", fsutil.COMMIT_MARKER))
    assert not fsutil.is_published("gs://bucket/rl")
    with pytest.raises(MissingFileError, match=r"gs://bucket/rl is not published \(no commit_success.txt\)"):
        fsutil.local_copy("gs://bucket/rl")
    assert make_toy_keywords("gs://bucket/rl", **RL_ARGS) == m and fsutil.is_published("gs://bucket/rl")

    # the evaluation set and the retrieval set: the same staging and publication
    make_toy_eval_set("gs://bucket/eval", n=2, size=32)
    make_toy_eval_set(tmp_path / "eval", n=2, size=32)
    _same_tree(os.path.join(bucket, "eval"), tmp_path / "eval")
    assert fake_gs.writes("gs://bucket/eval/")[-1].endswith(fsutil.COMMIT_MARKER)
    kw = dict(n_train=2, n_heldout=2, n_video_train=1, n_video_heldout=1, real_size=32)
    r = make_toy_retrieval("gs://bucket/ret", **kw)
    _same_tree(os.path.join(bucket, "ret"), make_toy_retrieval(tmp_path / "ret", **kw)["root"])
    assert r["root"].startswith(str(tmp_path / "cache")) and all(os.path.isfile(d["path"]) for d in r["datasets"].values())
    with pytest.raises(FileExistsError, match="gs://bucket/ret exists and does not hold a toy set with this config"):
        make_toy_retrieval("gs://bucket/ret", **dict(kw, seed=1))
    assert not any(".tmp-" in n or "embedrl-stage" in n for n in os.listdir(bucket) + os.listdir(tmp_path))


def test_a_failed_build_leaves_the_destination_untouched(fake_gs, tmp_path):
    for dest in (tmp_path / "out", "gs://bucket/out"):
        with fsutil.staged_dir(dest) as tmp:
            (tmp / "a.txt").write_text("old")
        with pytest.raises(RuntimeError, match="boom"):
            with fsutil.staged_dir(dest) as tmp:
                (tmp / "a.txt").write_text("new")
                raise RuntimeError("boom")
        assert (fsutil.as_path(dest) / "a.txt").read_text() == "old" and fsutil.is_published(dest)
    assert sorted(os.listdir(tmp_path)) == ["objects", "out"]  # no staging folder left behind
    assert sorted(os.listdir(os.path.join(fake_gs.root, "bucket", "out"))) == ["a.txt", fsutil.COMMIT_MARKER]


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    """A tiny random Qwen3-VL HF directory: weights, config, tokenizer (with <emb>), processor."""
    path = tmp_path_factory.mktemp("base") / "base"
    return save_tiny_embedder_dir(path)


def _params(handle):
    return jax.tree.map(to_host, handle.params)


def test_load_hf_from_an_object_store_streams_weights_and_copies_side_files(fake_gs, tiny_base, tmp_path):
    shutil.copytree(tiny_base, os.path.join(fake_gs.root, "bucket", "model"))  # uploaded by hand: no marker
    local = embedrl_jax.load_hf(tiny_base)
    remote = embedrl_jax.load_hf("gs://bucket/model")
    jax.tree.map(np.testing.assert_array_equal, _params(remote), _params(local))
    assert remote.config.name_or_path == "gs://bucket/model"
    assert dict(remote.config.to_dict(), _name_or_path="") == dict(local.config.to_dict(), _name_or_path="")
    # weights: ranged reads of the object, never copied; config, tokenizer, processor: a local copy
    assert ("open", "gs://bucket/model/model.safetensors", "rb") in fake_gs.log
    assert not [u for op, u, _ in fake_gs.log if op == "read" and u.endswith(".safetensors")]
    cached = [f for _, _, fs in os.walk(tmp_path / "cache") for f in fs]
    assert "config.json" in cached and "tokenizer.json" in cached and not [f for f in cached if f.endswith(".safetensors")]
    tok, tok_local = load_tokenizer("gs://bucket/model", "<emb>"), load_tokenizer(tiny_base, "<emb>")
    assert tok.get_vocab() == tok_local.get_vocab() and "<emb>" in tok.get_vocab()
    proc = load_image_processor("gs://bucket/model", remote.config)
    assert proc.to_dict() == load_image_processor(tiny_base, local.config).to_dict()

    # an export to the object store (sharded: index + several files) loads back the same
    out = embedrl_jax.save_hf(remote, "gs://bucket/export", max_shard_bytes=2**17)
    names = os.listdir(os.path.join(fake_gs.root, "bucket", "export"))
    assert INDEX_NAME in names and fsutil.COMMIT_MARKER in names and str(out) == "gs://bucket/export"
    assert fake_gs.writes("gs://bucket/export/")[-1].endswith(fsutil.COMMIT_MARKER)
    back = embedrl_jax.load_hf("gs://bucket/export")
    jax.tree.map(np.testing.assert_array_equal, _params(back), _params(local))


def test_missing_model_files_are_named(fake_gs, tiny_base, tmp_path):
    with pytest.raises(MissingFileError, match="Hugging Face model directory: gs://bucket/nothing does not exist"):
        embedrl_jax.load_hf("gs://bucket/nothing")
    with pytest.raises(MissingFileError, match=f"Hugging Face model directory: {tmp_path / 'nothing'} does not exist"):
        embedrl_jax.load_hf(tmp_path / "nothing")
    with pytest.raises(MissingFileError, match="tokenizer directory: gs://bucket/nothing does not exist"):
        load_tokenizer("gs://bucket/nothing")
    no_weights = os.path.join(fake_gs.root, "bucket", "no_weights")
    shutil.copytree(tiny_base, no_weights, ignore=shutil.ignore_patterns("*.safetensors"))
    with pytest.raises(MissingFileError, match="no safetensors weights in gs://bucket/no_weights"):
        embedrl_jax.load_hf("gs://bucket/no_weights")
    os.remove(os.path.join(no_weights, "config.json"))
    with pytest.raises(MissingFileError, match="no config.json in gs://bucket/no_weights"):
        embedrl_jax.load_hf("gs://bucket/no_weights")
    # an index that names a shard which is not there
    lost = os.path.join(fake_gs.root, "bucket", "lost_shard")
    shutil.copytree(tiny_base, lost)
    os.rename(os.path.join(lost, "model.safetensors"), os.path.join(lost, "model-00001-of-00001.safetensors"))
    with open(os.path.join(lost, INDEX_NAME), "w") as f:
        f.write('{"weight_map": {"a": "model-00001-of-00001.safetensors", "b": "model-00002-of-00002.safetensors"}}')
    with pytest.raises(MissingFileError, match="safetensors file gs://bucket/lost_shard/model-00002-of-00002.safetensors"):
        embedrl_jax.load_hf("gs://bucket/lost_shard")
