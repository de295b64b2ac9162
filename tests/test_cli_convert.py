"""`embedrl convert`: HF -> orbax -> HF bit-identical with tokenizer files, sharded restores,
typed config overrides, and one-line CLI errors."""
import dataclasses
import json

import jax
import numpy as np
import pytest

from embedrl_jax import checkpoint, safetensors_io as st
from embedrl_jax.cli import main
from embedrl_jax.config import apply_overrides, load_config, to_dict
from embedrl_jax.hf import param_shardings
from embedrl_jax.models.qwen3_vl.mapping import get_path
from embedrl_jax.sharding import MeshConfig, make_mesh
from tiny import IMAGE_ID, VEND, VIDEO_ID, VSTART, tiny_hf_model, tiny_tokenizer


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    hf = root / "hf"
    tiny_hf_model(tie=False).save_pretrained(hf)
    tokenizer = tiny_tokenizer()
    tokenizer.save_pretrained(hf)
    assert main(["convert", "hf-to-orbax", "--hf", str(hf), "--out", str(root / "ckpt")]) == 0
    assert main(["convert", "orbax-to-hf", "--ckpt", str(root / "ckpt"), "--out", str(root / "back"),
                 "--max-shard-size", "300000"]) == 0
    return root, tokenizer


def _tensors(path):
    reader = st.CheckpointReader(path)
    return {k: np.asarray(reader.get(k)) for k in reader.keys()}


def test_round_trip_is_bit_identical_with_tokenizer(converted):
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    root, tokenizer = converted
    ckpt, back = root / "ckpt", root / "back"
    assert (ckpt / "params").is_dir() and (ckpt / "config.json").exists() and (ckpt / "tokenizer.json").exists()
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no temporary directories left
    src, dst = _tensors(root / "hf"), _tensors(back)
    assert set(src) == set(dst)
    for key in src:
        assert src[key].dtype == dst[key].dtype and src[key].tobytes() == dst[key].tobytes(), key
    assert (back / st.INDEX_NAME).exists()  # --max-shard-size took effect

    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (back / name).exists(), name
    reloaded = AutoTokenizer.from_pretrained(back)
    text = "<|im_start|>the quick brown fox<|vision_start|><|image_pad|><|vision_end|><|im_end|>"
    assert reloaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert reloaded.convert_tokens_to_ids("<|image_pad|>") == tokenizer.convert_tokens_to_ids("<|image_pad|>")

    model = AutoModelForImageTextToText.from_pretrained(back)
    assert model.config.model_type == "qwen3_vl"
    assert model.config.image_token_id == IMAGE_ID and model.config.video_token_id == VIDEO_ID
    assert (model.config.vision_start_token_id, model.config.vision_end_token_id) == (VSTART, VEND)


def test_restore_onto_a_mesh_lands_in_shards(converted):
    root, _ = converted
    one = checkpoint.load_orbax(root / "ckpt")
    mesh = make_mesh(MeshConfig(2, 2, 2))
    handle = checkpoint.load_orbax(root / "ckpt", mesh=mesh)
    want = param_shardings(handle.model_def, mesh)
    path = ("layers", "gate")  # [layers, embed, mlp] -> (None, fsdp, tensor)
    leaf, sharding = get_path(handle.params, path), get_path(want, path)
    assert tuple(sharding.spec) == (None, "fsdp", "tensor")
    assert leaf.sharding.spec == sharding.spec and leaf.sharding.mesh.shape == mesh.shape
    assert len({d for d in leaf.sharding.device_set}) == 8
    np.testing.assert_array_equal(np.asarray(leaf), np.asarray(get_path(one.params, path)))
    for a, b in zip(jax.tree.leaves(handle.params), jax.tree.leaves(want)):
        assert a.sharding.spec == b.spec

    half = checkpoint.load_orbax(root / "ckpt", dtype="bfloat16")
    assert half.dtype == np.dtype("bfloat16")
    out = __import__("embedrl_jax").save_hf(half, root / "bf16")
    assert {t.dtype for t in _tensors(out).values()} == {np.dtype("bfloat16")}  # export keeps the restored dtype


def test_cli_user_errors_are_one_line(converted, tmp_path, capsys):
    root, _ = converted
    assert main(["convert", "hf-to-orbax", "--hf", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("embedrl: error: --hf") and "nope" in err[-1]
    assert "Traceback" not in "\n".join(err)

    assert main(["convert", "hf-to-orbax", "--hf", str(root / "hf"), "--out", str(root / "ckpt")]) == 2
    assert "exists and is not empty" in capsys.readouterr().err

    bad = tmp_path / "llama"
    bad.mkdir()
    cfg = json.loads((root / "hf" / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(dict(cfg, model_type="llama")))
    assert main(["convert", "orbax-to-hf", "--ckpt", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "model_type" in capsys.readouterr().err
    assert main(["convert", "hf-to-orbax", "--hf", str(root / "hf"), "--out", str(tmp_path / "o"), "--mesh", "2,x"]) == 2
    assert "--mesh" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    with pytest.raises(SystemExit):
        main(["convert", "sideways"])


# ------------------------------------------------------------------------ config
@dataclasses.dataclass(frozen=True)
class Optim:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: str = "cosine"


@dataclasses.dataclass(frozen=True)
class Run:
    name: str = "run"
    steps: int = 10
    flag: bool = False
    layers: tuple[int, ...] = ()
    note: str | None = None
    optim: Optim = Optim()
    mesh: MeshConfig = MeshConfig()


def test_config_overrides_and_errors(tmp_path):
    cfg = apply_overrides(Run(), ["optim.lr=3", "mesh.fsdp=-1", "mesh.tensor=2", "name=123", "flag=true",
                                  "layers=[1,2]", "note=null", "optim.betas=[0.5, 1]"])
    assert cfg.optim.lr == 3.0 and isinstance(cfg.optim.lr, float)
    assert cfg.mesh == MeshConfig(1, -1, 2) and cfg.name == "123" and cfg.flag is True
    assert cfg.layers == (1, 2) and cfg.note is None and cfg.optim.betas == (0.5, 1.0)
    assert Run().optim.lr == 1e-3  # the original is untouched
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.steps = 3
    with pytest.raises(ValueError, match="optim.lrr"):
        apply_overrides(cfg, ["optim.lrr=1"])
    with pytest.raises(ValueError, match="steps.*expected int"):
        apply_overrides(cfg, ["steps=many"])
    with pytest.raises(ValueError, match="flag.*expected bool"):
        apply_overrides(cfg, ["flag=yes"])
    with pytest.raises(ValueError, match=r"optim\.betas.*2 items"):
        apply_overrides(cfg, ["optim.betas=[1,2,3]"])
    with pytest.raises(ValueError, match="key=value"):
        apply_overrides(cfg, ["steps"])

    path = tmp_path / "run.json"
    path.write_text(json.dumps(to_dict(cfg)))
    assert load_config(path, Run) == cfg
    assert load_config(path.stem, Run, preset_dir=tmp_path) == cfg
    path.write_text(json.dumps({"optim": {"lr": "fast"}}))
    with pytest.raises(ValueError, match="optim.lr: expected float"):
        load_config(path, Run)
    path.write_text(json.dumps({"mesh": {"fsdp": 2, "pipeline": 4}}))
    with pytest.raises(ValueError, match="mesh.pipeline"):
        load_config(path, Run)
    with pytest.raises(FileNotFoundError, match="no_such_preset"):
        load_config("no_such_preset", Run, preset_dir=tmp_path)


def test_load_model_reads_either_kind_and_names_a_bad_directory(converted, tmp_path):
    """One loader for every entry point: orbax (has params/) and HF give the same weights."""
    root, _ = converted
    from_orbax = checkpoint.load_model(root / "ckpt")
    from_hf = checkpoint.load_model(root / "hf")
    assert from_orbax.source == root / "ckpt"
    for a, b in zip(jax.tree.leaves(from_orbax.params), jax.tree.leaves(from_hf.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(FileNotFoundError, match=r"reasoner directory .*empty: no config.json .* or params/"):
        (tmp_path / "empty").mkdir()
        checkpoint.load_model(tmp_path / "empty", what="reasoner")


def test_cli_user_errors_exit_2_and_bugs_keep_their_traceback(tmp_path, capsys, monkeypatch):
    """Unknown key, bad value, missing file: one line, status 2. Any other exception is a bug: it propagates."""
    import embedrl_jax.cli as cli

    work = str(tmp_path / "w")
    for args, needle in ((["optim.lrr=1"], "optim.lrr"), (["remat=sometimes"], "remat"),
                         (["--config", str(tmp_path / "none.json")], "none.json"),
                         (["model=/no/such/model"], "/no/such/model")):
        assert main(["train-embedder", "--workdir", work, *args]) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("embedrl: error:") and needle in err[-1] and "Traceback" not in "\n".join(err)

    def bug(args):
        raise KeyError("a bug, not a user error")

    monkeypatch.setattr(cli, "run_train_embedder", bug)
    with pytest.raises(KeyError, match="a bug"):
        main(["train-embedder", "--workdir", work])
    for verb in ("train-embedder", "sft-reasoner", "train-reasoner"):  # every train verb takes --no-export
        assert cli.build_parser().parse_args([verb, "--workdir", work, "--no-export"]).no_export
