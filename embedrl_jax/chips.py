"""Per-chip figures of the accelerators we plan for and measure on: HBM, bf16 peak, HBM bandwidth.

Why one table: `embedrl plan` sizes TPU slices with it (fits, roofline estimates) and
benchmarks/accelerator.py divides measured FLOP/s and bytes/s by the same peaks, so a planned
MFU and a measured one are against the same figure. `chip_of(device)` maps a live (or
compile-only) jax device to its row by `device_kind`; an unknown kind gives None and callers say
so instead of guessing a peak.
"""
from __future__ import annotations

import dataclasses

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    """One chip: HBM capacity, dense bf16 peak FLOP/s, HBM bandwidth (bytes/s); TPU slice geometry."""

    kind: str
    hbm_bytes: int
    peak_flops: float | None
    hbm_bandwidth: float | None
    grid_dims: int = 1  # 3 for the 3-D torus chips (v4, v5p), 2 for v5e / v6e
    cores_per_chip: int = 1  # Cloud accelerator types count TensorCores for v4 / v5p


# public Cloud TPU figures (bf16 dense peak, HBM capacity and bandwidth per chip)
TPU_CHIPS = {
    "v4": Chip("v4", 32 * GiB, 275e12, 1.228e12, 3, 2),
    "v5e": Chip("v5e", 16 * GiB, 197e12, 0.819e12, 2, 1),
    "v5p": Chip("v5p", 95 * GiB, 459e12, 2.765e12, 3, 2),
    "v6e": Chip("v6e", 32 * GiB, 918e12, 1.640e12, 2, 1),
}
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6litepod": "v6e"}

# NVIDIA data-sheet figures: dense bf16 tensor-core peak (the sparse figure halved), HBM
# capacity and bandwidth; form factors differ in clocks and memory, so each has its row
GPU_CHIPS = {
    "A100-40GB": Chip("A100-40GB", 40 * 10**9, 312e12, 1.555e12),
    "A100-80GB-PCIe": Chip("A100-80GB-PCIe", 80 * 10**9, 312e12, 1.935e12),
    "A100-80GB": Chip("A100-80GB", 80 * 10**9, 312e12, 2.039e12),
    "H100-PCIe": Chip("H100-PCIe", 80 * 10**9, 756e12, 2.0e12),
    "H100-NVL": Chip("H100-NVL", 94 * 10**9, 835e12, 3.9e12),
    "H100": Chip("H100", 80 * 10**9, 989e12, 3.35e12),
    "H200-NVL": Chip("H200-NVL", 141 * 10**9, 835e12, 4.8e12),
    "H200": Chip("H200", 141 * 10**9, 989e12, 4.8e12),
}

# jax `device_kind` strings ("TPU v5 lite", "TPU v5p", ...) -> TPU_CHIPS key
_TPU_KINDS = {"tpu v4": "v4", "tpu v5 lite": "v5e", "tpu v5e": "v5e", "tpu v5": "v5p", "tpu v5p": "v5p",
              "tpu v6 lite": "v6e", "tpu v6e": "v6e"}
# (words that must all appear in a GPU's device_kind, GPU_CHIPS key): the first match wins,
# so the specific form factors come before the plain SXM rows
_GPU_RULES = ((("a100", "40gb"), "A100-40GB"), (("a100", "pcie"), "A100-80GB-PCIe"), (("a100",), "A100-80GB"),
              (("h100", "pcie"), "H100-PCIe"), (("h100", "nvl"), "H100-NVL"), (("h100",), "H100"),
              (("h200", "nvl"), "H200-NVL"), (("h200",), "H200"))


def chip_of(device) -> Chip | None:
    """The table row of a jax device from its platform and `device_kind`; None when not known
    (CPUs, other GPUs, future TPUs): no peak is guessed."""
    kind = str(getattr(device, "device_kind", "")).strip().lower()
    platform = getattr(device, "platform", "")
    if platform == "tpu":
        name = _TPU_KINDS.get(kind)
        return TPU_CHIPS[name] if name else None
    if platform in ("gpu", "cuda", "rocm"):
        for words, name in _GPU_RULES:
            if all(w in kind for w in words):
                return GPU_CHIPS[name]
    return None
