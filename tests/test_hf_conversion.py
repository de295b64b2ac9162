"""HF -> JAX -> HF: bit-identical tensors, loadable exports, atomic writes, named errors."""
import json
import shutil

import numpy as np
import pytest

import embedrl_jax
from embedrl_jax import safetensors_io as st
from tiny import IMAGE_ID, build_inputs, hf_logits, real_image, tiny_hf_model

pytestmark = pytest.mark.parity


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def saved(request, tmp_path_factory):
    model = tiny_hf_model(tie=request.param)
    path = tmp_path_factory.mktemp("hf")
    model.save_pretrained(path)
    return model, path


def _tensors(path):
    reader = st.CheckpointReader(path)
    return {k: np.asarray(reader.get(k)) for k in reader.keys()}


def test_round_trip_is_bit_identical_and_loads_in_transformers(saved, tmp_path):
    from transformers import AutoModelForImageTextToText

    model, path = saved
    handle = embedrl_jax.load_hf(path)
    out = embedrl_jax.save_hf(handle, tmp_path / "export")
    src, dst = _tensors(path), _tensors(out)
    assert set(src) == set(dst)
    assert ("lm_head.weight" in dst) == (not model.config.tie_word_embeddings)
    for key in src:
        assert src[key].dtype == dst[key].dtype, key
        assert src[key].tobytes() == dst[key].tobytes(), key

    reloaded = AutoModelForImageTextToText.from_pretrained(out).eval()
    inputs = build_inputs([[5, ("image", real_image("astronaut", (96, 64))), 4]])
    np.testing.assert_array_equal(hf_logits(reloaded, inputs), hf_logits(model, inputs))
    assert json.loads((out / "config.json").read_text())["model_type"] == "qwen3_vl"


def test_sharded_export_with_index_streams_back(saved, tmp_path):
    model, path = saved
    handle = embedrl_jax.load_hf(path)
    out = embedrl_jax.save_hf(handle, tmp_path / "sharded", max_shard_bytes=200_000)
    index = json.loads((out / st.INDEX_NAME).read_text())
    assert len(set(index["weight_map"].values())) > 1
    again = embedrl_jax.load_hf(out)
    inputs = build_inputs([[5, ("image", real_image("coffee", (64, 96))), 4]])
    np.testing.assert_array_equal(again.logits(**inputs), handle.logits(**inputs))


def test_failed_export_leaves_nothing(saved, tmp_path, monkeypatch):
    _, path = saved
    handle = embedrl_jax.load_hf(path)
    calls = []

    def broken(p, items):
        calls.append(p)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_write(p, items)

    real_write = st.write_file
    monkeypatch.setattr(st, "write_file", broken)
    with pytest.raises(OSError, match="disk full"):
        embedrl_jax.save_hf(handle, tmp_path / "out", max_shard_bytes=200_000)
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_to_clobber(saved, tmp_path):
    _, path = saved
    handle = embedrl_jax.load_hf(path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        embedrl_jax.save_hf(handle, tmp_path / "out")
    embedrl_jax.save_hf(handle, tmp_path / "out", overwrite=True)
    assert not (tmp_path / "out" / "keep.txt").exists()
    assert (tmp_path / "out" / "config.json").exists()


def _rewrite(path, dst, change):
    shutil.copytree(path, dst)
    tensors = _tensors(path)
    change(tensors)
    (dst / "model.safetensors").unlink()
    st.write_file(dst / "model.safetensors", sorted(tensors.items()))
    return dst


def test_bad_checkpoints_name_the_tensor(saved, tmp_path):
    _, path = saved
    key = "model.language_model.layers.1.self_attn.k_proj.weight"
    missing = _rewrite(path, tmp_path / "missing", lambda t: t.pop(key))
    with pytest.raises(ValueError, match="missing tensors.*k_proj"):
        embedrl_jax.load_hf(missing)
    extra = _rewrite(path, tmp_path / "extra", lambda t: t.update({"model.surprise.weight": np.zeros(3, np.float32)}))
    with pytest.raises(ValueError, match="unexpected tensors.*surprise"):
        embedrl_jax.load_hf(extra)
    shaped = _rewrite(path, tmp_path / "shaped", lambda t: t.update({key: np.zeros((3, 64), np.float32)}))
    with pytest.raises(ValueError, match="k_proj.*expects"):
        embedrl_jax.load_hf(shaped)


def test_unsupported_model_type(saved, tmp_path):
    _, path = saved
    bad = shutil.copytree(path, tmp_path / "llama")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model_type"] = "llama"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="model_type.*'llama'"):
        embedrl_jax.load_hf(bad)


def test_bad_inputs_name_the_field(saved):
    _, path = saved
    handle = embedrl_jax.load_hf(path)
    good = build_inputs([[5, ("image", real_image("astronaut", (96, 64))), 4]])
    short = dict(good)
    ids = good["input_ids"].copy()
    ids[0, list(ids[0]).index(IMAGE_ID)] = 42  # one placeholder fewer
    short["input_ids"] = ids
    short["mm_token_type_ids"] = (ids == IMAGE_ID).astype(np.int64)
    with pytest.raises(ValueError, match="image placeholder tokens"):
        handle.logits(**short)
    grid = dict(good, image_grid_thw=np.array([[1, 8, 4]]))
    with pytest.raises(ValueError, match="image_grid_thw describes 32 patches but pixel_values has 24"):
        handle.logits(**grid)
    with pytest.raises(ValueError, match="mm_token_type_ids is required"):
        handle.logits(**{k: v for k, v in good.items() if k != "mm_token_type_ids"})
    with pytest.raises(TypeError, match="unexpected inputs"):
        handle.logits(**good, pixel_mask=np.ones(3))
