"""The trainer core: the shared config, trainers built from shapes alone, presets as package data,
and the one-way import graph."""
import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from embedrl_jax.config import apply_overrides, load_config
from embedrl_jax.errors import ConfigError, UserError
from embedrl_jax.sharding import MeshConfig, make_mesh
from embedrl_jax.train.core import TrainerConfig
from embedrl_jax.train.embedder import EmbedderTrainConfig, EmbedderTrainer
from embedrl_jax.train.reasoner import ReasonerRLConfig, ReasonerRLTrainer
from embedrl_jax.train.sft import SFTConfig, SFTTrainer

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "embedrl_jax"


@pytest.mark.parametrize("name,cls", [("toy_embedder", EmbedderTrainConfig), ("toy_reasoner_rl", ReasonerRLConfig),
                                      ("sft_reasoner_example", SFTConfig)])
def test_toy_configs_keep_their_flat_keys(name, cls):
    """Every key of the toy configs still loads (the shared fields are inherited, not renamed)."""
    raw = json.loads((ROOT / "configs" / f"{name}.json").read_text())
    cfg = load_config(name, cls)
    assert isinstance(cfg, TrainerConfig)
    assert cfg.steps == raw["steps"] and cfg.seed == raw["seed"] and cfg.mesh.fsdp == raw["mesh"]["fsdp"]
    cfg = apply_overrides(cfg, ["steps=7", "mesh.fsdp=2", "buckets.seq_min=32", "checkpoint_every=3", "export=false"])
    assert (cfg.steps, cfg.mesh.fsdp, cfg.buckets.seq_min, cfg.checkpoint_every, cfg.export) == (7, 2, 32, 3, False)


def test_remat_is_a_policy_name_and_booleans_still_work():
    assert EmbedderTrainConfig(remat=True).remat == "full" and EmbedderTrainConfig(remat=False).remat == "none"
    assert apply_overrides(SFTConfig(), ["remat=dots"]).remat == "dots"
    assert apply_overrides(SFTConfig(), ["remat=true"]).remat == "full"
    with pytest.raises(ConfigError, match="remat.*'sometimes'"):
        apply_overrides(SFTConfig(), ["remat=sometimes"])


@pytest.mark.parametrize("override,field", [("steps=0", "steps"), ("compute_dtype=float64", "compute_dtype"),
                                            ("eval_every=-1", "eval_every"), ("epochs=0", "epochs"),
                                            ("grad_cache_chunks=0", "grad_cache_chunks")])
def test_shared_config_errors_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field) as e:
        apply_overrides(EmbedderTrainConfig(), [override])
    assert isinstance(e.value, UserError) and isinstance(e.value, ValueError)


def test_grpo_config_is_checked_where_built():
    with pytest.raises(ConfigError, match="mini_batches"):
        apply_overrides(ReasonerRLConfig(), ["rollout.pairs_per_step=3", "grpo.mini_batches=4"])


def _lowered(trainer, **dims):
    progs = trainer.programs(**dims)
    assert set(progs) == {"update"}
    fn, args = progs["update"]
    leaves = jax.tree.leaves(args)
    assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) and x.sharding is not None for x in leaves)
    return fn.lower(*args)


def _abstract_embedder(work):
    cfg = apply_overrides(load_config("toy_embedder", EmbedderTrainConfig), ["grad_cache_chunks=2"])
    return EmbedderTrainer(cfg, work, mesh=make_mesh(MeshConfig(2, 2, 2)), abstract=True)


def test_abstract_embedder_trainer_lowers_without_reading_anything(tmp_path):
    """Built from shapes alone: no workdir, no toy base, no data; its donated update lowers on a
    2x2x2 mesh with the run's shardings."""
    work = tmp_path / "never"
    tr = _abstract_embedder(work)
    assert not work.exists()
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(tr.state))
    q = tr.state["params"]["model"]["layers"]["q_lora_a"]
    assert q.sharding.spec[1] == "fsdp"  # adapters sharded like their weights, as in a real run
    text = _lowered(tr, pairs=16, seq=256, vision=(16, 64)).as_text()
    assert "tf.aliasing_output" in text or "jax.buffer_donor" in text  # the state is donated
    with pytest.raises(UserError, match="abstract"):
        tr.run()


@pytest.mark.slow
def test_abstract_trainers_compile(tmp_path):
    """Each trainer's update compiles from abstract arguments (what `plan` does for a TPU slice)."""
    assert _lowered(_abstract_embedder(tmp_path / "e"), pairs=16, seq=256, vision=(16, 64)).compile().memory_analysis()
    mesh = make_mesh(MeshConfig(1, 4, 2))
    sft = SFTTrainer(apply_overrides(load_config("sft_reasoner_example", SFTConfig), ["micro_batches=2"]),
                     tmp_path / "sft", mesh=mesh, abstract=True)
    _lowered(sft, samples=8, prompt=64, completion=32, vision=(8, 64)).compile()
    rl_cfg = apply_overrides(ReasonerRLConfig(policy="tiny"), ["rollout.pairs_per_step=2", "rollout.samples=2",
                                                                "rollout.max_new_tokens=16"])
    rl = ReasonerRLTrainer(rl_cfg, tmp_path / "rl", mesh=mesh, abstract=True)
    _lowered(rl, prompts=4, prompt=32).compile()
    assert not any(tmp_path.iterdir())


def _imports(path: Path) -> set[str]:
    """Absolute names of the embedrl_jax modules a file imports (top level and inside functions)."""
    pkg = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = pkg.rsplit(".", node.level - 1)[0] if node.level else ""
            name = ".".join(p for p in (base, node.module or "") if p) if node.level else node.module or ""
            out.add(name)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {n for n in out if n.startswith("embedrl_jax")}


def test_dependencies_flow_one_way():
    """rl/ imports nothing from train/; the GRPO trainer lives in train/; torch stays out of the product
    path of the main job (train/, toy/, data/, embed/, the CLI)."""
    for path in (PKG / "rl").glob("*.py"):
        assert not any(n.startswith("embedrl_jax.train") for n in _imports(path)), path
    assert not (PKG / "rl" / "trainer.py").exists()
    for sub in ("train", "toy", "data", "embed"):
        for path in (PKG / sub).glob("*.py"):
            assert "embedrl_jax.testing" not in _imports(path), path
            assert "import torch" not in path.read_text(), path


@pytest.mark.slow
def test_installed_package_finds_presets_from_any_directory(tmp_path):
    """A non-editable install (pip install --target) loads the toy preset and a model preset from
    another working directory: presets ship as package data."""
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(ROOT)], check=True, timeout=600)
    code = ("import embedrl_jax.config as c; from embedrl_jax.models.qwen3_vl.config import load_preset;"
            "from embedrl_jax.train.embedder import EmbedderTrainConfig as E;"
            "cfg = c.load_config('configs/toy_embedder.json', E); p = load_preset('qwen3_vl_2b_instruct');"
            "print(c.PRESET_DIR, cfg.steps, p.text.hidden_size)")
    env = dict(os.environ, PYTHONPATH=str(target))
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, check=True, capture_output=True,
                         text=True, timeout=300).stdout.split()
    assert out[0].startswith(str(target)) and out[1:] == ["60", "2048"]


def test_epochs_count_passes_over_the_data(tmp_path):
    from embedrl_jax.train.core import Trainer

    class Toy(Trainer):
        def steps_per_epoch(self):
            return 2.5  # e.g. 20 samples in batches of 8

    mesh = make_mesh(MeshConfig(1, 1, 1), devices=jax.devices()[:1])
    assert Toy(TrainerConfig(epochs=2.0, steps=99), tmp_path / "a", mesh=mesh).total_steps() == 5
    assert Toy(TrainerConfig(steps=7), tmp_path / "b", mesh=mesh).total_steps() == 7
    assert json.loads((tmp_path / "a" / "config.json").read_text())["epochs"] == 2.0
