"""Abstract step arguments: ShapeDtypeStructs with shardings, for compiling a trainer's programs
without data (`Trainer.programs`)."""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding

from ..models.qwen3_vl.config import Qwen3VLConfig
from ..models.qwen3_vl.inputs import Buckets, pack_inputs
from ..sharding import logical_to_spec

__all__ = ["abstract_of", "packed_spec", "placed_spec"]

VISION_KEYS = ("patches", "segment_ids", "pos_idx", "pos_w", "rowcol")


def abstract_of(tree):
    """ShapeDtypeStructs (with their shardings) of a tree of arrays or ShapeDtypeStructs."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def packed_spec(mcfg: Qwen3VLConfig, rows: int, seq: int, vision: tuple[int, int] | None = None,
                lead: tuple[int, ...] = ()) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes and dtypes of `pack_inputs`' arrays for `rows` samples of `seq` tokens and `vision`
    = (patch rows, row length), each with leading dims `lead`: read off one tiny packing, so the
    spec follows whatever the packer emits."""
    n = mcfg.vision.spatial_merge_size ** 2
    tiny, _ = pack_inputs(mcfg, np.zeros((1, 8), np.int32), pad_to=8, vision=(1, n) if vision else None,
                          buckets=Buckets(exact=True))
    out = {}
    for k, a in tiny.items():
        if k == "positions":
            shape = (a.shape[0], rows, seq)
        elif k in VISION_KEYS:
            shape = (vision[0], vision[1]) + a.shape[2:]
        else:
            shape = (rows, seq) + a.shape[2:]
        out[k] = jax.ShapeDtypeStruct(tuple(lead) + shape, a.dtype)
    return out


def placed_spec(mesh, spec: dict[str, jax.ShapeDtypeStruct], axes: dict[str, tuple]) -> dict[str, jax.ShapeDtypeStruct]:
    """The same ShapeDtypeStructs carrying the shardings the rules table gives their logical axes."""
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype,
                                    sharding=NamedSharding(mesh, logical_to_spec(axes[k], v.shape, mesh)))
            for k, v in spec.items()}
