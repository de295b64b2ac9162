"""Per-platform lowering choices, decided from the devices a program is compiled for.

A program compiled on this CPU host for compile-only TPU devices must get the TPU graph, so
nothing here asks the host for its default backend; the platform comes from the mesh the
program is traced under (`jax.set_mesh`, the sharding context every trainer and the Reasoner
use), from an explicit `Target`, or, with no mesh at all, from the default device.

`Target` is the one place that maps a platform onto the choices that depend on it:
- the layer loop: XLA:CPU unrolls the stacked layers (inside a scan it copies each layer's
  weight slices and saved activations at every iteration; unrolled it reads them in place, 21 %
  faster on the 80M Embedder step); accelerators keep a rolled `lax.scan` (compile time flat in
  depth, the slices read in place);
- attention row chunking: on CPU a few batch rows at a time (the fp32 score block stays within
  ~8 MiB, cache-resident); on accelerators every row in one step;
- the attention kernel `attention="auto"` means (`models/qwen3_vl/attention.py`): Pallas splash on TPU,
  cuDNN fused attention on GPU (for the layouts it takes; xla for the rest), xla on CPU;
- the default remat policy: `full` on accelerators, `none` on CPU (see `remat_policy`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax

PLATFORMS = ("cpu", "gpu", "tpu")
REMAT = ("none", "full", "dots", "dots_no_batch", "offload")
SCORE_BLOCK_BYTES = 8 * 2**20


@dataclasses.dataclass(frozen=True)
class Target:
    """The platform a program is compiled for, and the lowering choices that follow from it."""

    platform: str

    def __post_init__(self):
        if self.platform not in PLATFORMS:
            raise ValueError(f"unknown target platform {self.platform!r}; expected one of {PLATFORMS}")

    @property
    def unroll_layers(self) -> bool:
        """Whether layer loops are unrolled (XLA:CPU) rather than a rolled `lax.scan`."""
        return self.platform == "cpu"

    @property
    def decode_layer_loop(self) -> str:
        """KV-cache decoding: "unrolled" (per-layer weights split once per generate call, per-layer
        caches) on XLA:CPU, "scan" (stacked weights and caches) on accelerators."""
        return "unrolled" if self.unroll_layers else "scan"

    @property
    def attention_kernel(self) -> str:
        """The kernel `attention="auto"` runs: splash on TPU, cudnn on GPU, xla on CPU (where
        splash only runs in Pallas interpret mode and the fused GPU kernel does not exist)."""
        return {"tpu": "splash", "gpu": "cudnn", "cpu": "xla"}[self.platform]

    @property
    def default_remat(self) -> str:
        return "none" if self.platform == "cpu" else "full"

    def attention_rows(self, rows: int, row_score_bytes: int) -> int:
        """Batch rows per attention step: on CPU as many as keep one fp32 score block within
        ~8 MiB (materialising every row's scores at once was ~2x slower for image-sized rows);
        on accelerators all rows at once."""
        if self.platform != "cpu":
            return rows
        return int(max(1, min(rows, SCORE_BLOCK_BYTES // max(row_score_bytes, 1))))

    @property
    def frozen_dtype(self) -> str:
        """Dtype of weights nothing trains (LoRA base, GRPO reference, reward Embedder, judge) when
        the config says "auto": bfloat16 on accelerators (half the HBM; their matmuls take bf16
        operands anyway), float32 on XLA:CPU (bf16 matmuls there are emulated, slower, and the CPU
        suite's parity tests are fp32)."""
        return "float32" if self.platform == "cpu" else "bfloat16"


def platform_of(mesh=None) -> str:
    """Platform of a mesh's devices (concrete or abstract mesh); the default device's for None."""
    if mesh is None or mesh.empty:
        return jax.devices()[0].platform
    if isinstance(mesh, jax.sharding.AbstractMesh):
        device = mesh.abstract_device
        if device is None:
            raise ValueError(f"abstract mesh {mesh} carries no device platform; pass an explicit Target")
        return device.platform
    return mesh.devices.flat[0].platform


def frozen_dtype(setting: str, mesh=None) -> str:
    """A frozen-weights dtype setting resolved for the devices of `mesh`: "auto" -> the target's
    `Target.frozen_dtype` (bfloat16 on TPU/GPU, float32 on XLA:CPU); anything else as given."""
    return target_of(mesh).frozen_dtype if setting == "auto" else setting


def target_of(mesh=None) -> Target:
    return Target(platform_of(mesh))


def current_target() -> Target:
    """The target of the program being traced: the mesh in the sharding context, else the default device."""
    return target_of(jax.sharding.get_abstract_mesh())


def resolve(target: Target | str | None) -> Target:
    """None -> `current_target()`; a platform name -> its Target."""
    if target is None:
        return current_target()
    return target if isinstance(target, Target) else Target(str(target))


def remat_name(remat: bool | str | None, target: Target) -> str:
    """Normalise a remat setting: booleans (older configs) map True -> full, False -> none;
    None / "auto" take the target's default (`full` on accelerators)."""
    if remat is None or remat == "auto":
        return target.default_remat
    if isinstance(remat, bool):
        return "full" if remat else "none"
    if remat not in REMAT:
        raise ValueError(f"remat must be one of {REMAT}, 'auto' or a bool, got {remat!r}")
    return remat


def remat_policy(remat: bool | str | None, target: Target) -> tuple[bool, Callable[..., Any] | None]:
    """(checkpoint?, jax.checkpoint policy) for a remat setting; applied per layer.

    - none: no rematerialisation (every activation saved);
    - full: save nothing inside a layer, recompute it in the backward pass;
    - dots: save every matmul output (`dots_saveable`), recompute the elementwise rest;
    - dots_no_batch: save the weight matmuls only (`dots_with_no_batch_dims_saveable`), not the
      batched attention score/value products, which grow with length squared;
    - offload: as dots_no_batch, but the saved matmul outputs go to pinned host memory
      (`offload_dot_with_no_batch_dims("device", "pinned_host")`), brought back for the backward
      pass; it compiles and runs on XLA:CPU and compiles for TPU.
    """
    name = remat_name(remat, target)
    policies = jax.checkpoint_policies
    return {
        "none": (False, None),
        "full": (True, None),
        "dots": (True, policies.dots_saveable),
        "dots_no_batch": (True, policies.dots_with_no_batch_dims_saveable),
        "offload": (True, policies.offload_dot_with_no_batch_dims("device", "pinned_host")),
    }[name]
