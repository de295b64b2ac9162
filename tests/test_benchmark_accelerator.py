"""benchmarks/accelerator.py on the CPU mesh: the toy presets run end to end and print every
figure (no timing is asserted), the chip table maps device kinds, and bad flags are named."""
import importlib.util
import re
import types
from pathlib import Path

import jax
import numpy as np
import pytest

from embedrl_jax import plan as plan_lib
from embedrl_jax.chips import GPU_CHIPS, TPU_CHIPS, chip_of

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "accelerator.py"
_spec = importlib.util.spec_from_file_location("benchmark_accelerator", SCRIPT)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

# the toy presets, shrunk further to keep XLA:CPU's compile short: two devices (still a sharded
# mesh), one decoder layer, short sequences, one GradCache chunk, no LoRA dropout
TINY = ["--preset", "tiny", "--devices", "2", "--layers", "1", "--seqs-per-chip", "2", "--chunks", "1", "--steps", "1",
        "--warmup", "1", "--set", "buckets.seq_min=32", "inputs.image_max_tokens=4", "inputs.max_text_tokens=8",
        "lora.dropout=0", "--cache-len", "32", "--decode-steps", "4", "--decode-repeats", "1"]


def _number(pattern, text):
    m = re.search(pattern, text)
    assert m, f"{pattern!r} not in output:\n{text}"
    return float(m.group(1))


@pytest.mark.slow
def test_tiny_preset_prints_every_figure(capsys):
    assert bench.main(TINY) == 0
    out = capsys.readouterr().out
    assert f"jax {jax.__version__}" in out and "jaxlib " in out
    assert "devices: 2 x 'cpu' (platform cpu)" in out and "'fsdp': 2" in out
    assert _number(r"pairs/s: ([\d.]+)", out) > 0
    assert _number(r"loss ([\d.]+)", out) > 0  # finite: the non-finite guard would skip the update
    assert "skipped steps 0" in out
    assert "4 pairs = 8 sequences" in out  # 2 per chip x 2 batch devices x 1 chunk
    assert "MFU: no peak known for cpu (device kind 'cpu')" in out
    assert _number(r"tokens/s: ([\d.]+) \(", out.split("== Reasoner decode")[1]) > 0
    assert "HBM bound: no bandwidth known for cpu" in out
    assert "1 text layers" in out


@pytest.mark.parametrize("platform,kind,expect", [
    ("tpu", "TPU v4", "v4"), ("tpu", "TPU v5 lite", "v5e"), ("tpu", "TPU v5e", "v5e"), ("tpu", "TPU v5", "v5p"),
    ("tpu", "TPU v5p", "v5p"), ("tpu", "TPU v6 lite", "v6e"), ("gpu", "NVIDIA H100 80GB HBM3", "H100"),
    ("gpu", "NVIDIA H100 PCIe", "H100-PCIe"), ("gpu", "NVIDIA H200", "H200"), ("gpu", "NVIDIA A100-SXM4-40GB", "A100-40GB"),
    ("gpu", "NVIDIA A100-SXM4-80GB", "A100-80GB"), ("cpu", "cpu", None), ("tpu", "TPU v7x", None),
    ("gpu", "NVIDIA GeForce RTX 4090", None),
])
def test_chip_of_device_kind(platform, kind, expect):
    chip = chip_of(types.SimpleNamespace(platform=platform, device_kind=kind))
    assert (chip.kind if chip else None) == expect
    if chip:
        assert chip.peak_flops > 1e14 and chip.hbm_bandwidth > 5e11


def test_plan_uses_the_shared_tpu_table():
    assert plan_lib.CHIPS is TPU_CHIPS and not set(GPU_CHIPS) & set(TPU_CHIPS)
    assert plan_lib.resolve_target("v5p-64").chip is TPU_CHIPS["v5p"]


def test_helpers():
    assert bench.image_grid(768, 2) == (48, 64) and bench.image_grid(16, 2) == (8, 8)
    cut = bench.cut_layers(bench.hf_dict("qwen3_vl_2b_instruct", "model"), 2)
    assert cut["text_config"]["num_hidden_layers"] == 2 and len(cut["vision_config"]["deepstack_visual_indexes"]) == 2
    noise = np.asarray(bench.hash_noise((256, 512), np.float32, 3))
    assert abs(noise.std() - 0.02) < 1e-3 and abs(noise.mean()) < 1e-3
    assert not np.array_equal(noise, np.asarray(bench.hash_noise((256, 512), np.float32, 4)))


@pytest.mark.parametrize("argv,match", [
    (["--layers", "0"], "--layers must be >= 1"),
    (["--skip-train", "--cache-len", "8", "--decode-steps", "8"], "--decode-steps 8 must be below --cache-len 8"),
    (["--skip-decode", "--tokens", "10"], r"--tokens 10: .*image of 16 tokens"),
    (["--mesh", "3,1,1"], "--mesh 3,1,1"),
    (["--devices", "9"], "--devices 9: this process has 8 local devices"),
    (["--skip-decode", "--set", "inputs.image_max_tokens=2"], "image_min_tokens <= image_max_tokens"),
    (["--embedder-config", "configs/toy_reasoner_rl.json"], "a egrl config, not a train-embedder one"),
])
def test_bad_flags_are_named(argv, match, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--preset", "tiny", *argv])
    assert re.search(match, str(e.value.code) + capsys.readouterr().err)
