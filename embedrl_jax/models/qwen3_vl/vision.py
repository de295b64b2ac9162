"""Qwen3-VL vision tower on packed patch rows.

Inputs come from `inputs.pack_vision`: patches [R, S, C*Tp*P*P] with segment ids, the
bilinear position-table taps and (row, col) ids per patch. Output: merged tokens
[R*S/4, D] and one DeepStack tensor per tapped block, in the same flat row order.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ...sharding import constrain
from .config import VisionConfig
from .layers import attention, layer_norm, param, scan_layers, stacked
from .rope import apply_rope, vision_cos_sin


class VisionBlock(nnx.Module):
    def __init__(self, cfg: VisionConfig, rngs: nnx.Rngs):
        d, n, h, f = cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.intermediate_size
        self.eps = cfg.layer_norm_eps
        self.norm1_scale = param(rngs, (d,), ("norm",), "ones")
        self.norm1_bias = param(rngs, (d,), ("norm",), "zeros")
        self.q = param(rngs, (d, n, h), ("vision_embed", "vision_heads", "head_dim"))
        self.k = param(rngs, (d, n, h), ("vision_embed", "vision_heads", "head_dim"))
        self.v = param(rngs, (d, n, h), ("vision_embed", "vision_heads", "head_dim"))
        self.q_bias = param(rngs, (n, h), ("vision_heads", "head_dim"), "zeros")
        self.k_bias = param(rngs, (n, h), ("vision_heads", "head_dim"), "zeros")
        self.v_bias = param(rngs, (n, h), ("vision_heads", "head_dim"), "zeros")
        self.o = param(rngs, (n, h, d), ("vision_heads", "head_dim", "vision_embed"))
        self.o_bias = param(rngs, (d,), ("norm",), "zeros")
        self.norm2_scale = param(rngs, (d,), ("norm",), "ones")
        self.norm2_bias = param(rngs, (d,), ("norm",), "zeros")
        self.fc1 = param(rngs, (d, f), ("vision_embed", "vision_mlp"))
        self.fc1_bias = param(rngs, (f,), ("vision_mlp",), "zeros")
        self.fc2 = param(rngs, (f, d), ("vision_mlp", "vision_embed"))
        self.fc2_bias = param(rngs, (d,), ("norm",), "zeros")

    def __call__(self, x, cos, sin, segment_ids):
        dt = x.dtype
        y = layer_norm(x, self.norm1_scale[...], self.norm1_bias[...], self.eps)
        q = jnp.einsum("rsd,dnh->rnsh", y, self.q[...].astype(dt)) + self.q_bias[...][:, None].astype(dt)
        k = jnp.einsum("rsd,dnh->rnsh", y, self.k[...].astype(dt)) + self.k_bias[...][:, None].astype(dt)
        v = jnp.einsum("rsd,dnh->rnsh", y, self.v[...].astype(dt)) + self.v_bias[...][:, None].astype(dt)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        a = attention(q, k, v, segment_ids, segment_ids)
        x = x + jnp.einsum("rnsh,nhd->rsd", a, self.o[...].astype(dt)) + self.o_bias[...].astype(dt)
        y = layer_norm(x, self.norm2_scale[...], self.norm2_bias[...], self.eps)
        y = jnp.einsum("rsd,df->rsf", y, self.fc1[...].astype(dt)) + self.fc1_bias[...].astype(dt)
        y = jax.nn.gelu(y, approximate=True)  # gelu_pytorch_tanh
        y = jnp.einsum("rsf,fd->rsd", y, self.fc2[...].astype(dt)) + self.fc2_bias[...].astype(dt)
        return constrain(x + y, ("batch", None, None))


class PatchMerger(nnx.Module):
    """2x2 patch merge + MLP. `postshuffle` norms the concatenated 4*Dv vector (DeepStack)."""

    def __init__(self, cfg: VisionConfig, postshuffle: bool, rngs: nnx.Rngs):
        d, u = cfg.hidden_size, cfg.merge_unit
        self.postshuffle = postshuffle
        self.eps = cfg.layer_norm_eps
        width = d * u if postshuffle else d
        self.norm_scale = param(rngs, (width,), ("norm",), "ones")
        self.norm_bias = param(rngs, (width,), ("norm",), "zeros")
        self.fc1 = param(rngs, (d * u, d * u), ("vision_mlp", "vision_embed"))
        self.fc1_bias = param(rngs, (d * u,), ("norm",), "zeros")
        self.fc2 = param(rngs, (d * u, cfg.out_hidden_size), ("vision_mlp", "embed"))
        self.fc2_bias = param(rngs, (cfg.out_hidden_size,), ("norm",), "zeros")

    def __call__(self, x, unit: int):
        r, s, d = x.shape
        dt = x.dtype
        if self.postshuffle:
            x = layer_norm(x.reshape(r, s // unit, d * unit), self.norm_scale[...], self.norm_bias[...], self.eps)
        else:
            x = layer_norm(x, self.norm_scale[...], self.norm_bias[...], self.eps).reshape(r, s // unit, d * unit)
        x = jnp.einsum("rtc,ce->rte", x, self.fc1[...].astype(dt)) + self.fc1_bias[...].astype(dt)
        x = jax.nn.gelu(x, approximate=False)  # nn.GELU(): exact erf
        x = jnp.einsum("rte,eo->rto", x, self.fc2[...].astype(dt)) + self.fc2_bias[...].astype(dt)
        return x.reshape(r * (s // unit), -1)


class VisionTower(nnx.Module):
    def __init__(self, cfg: VisionConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        d = cfg.hidden_size
        self.patch_embed = param(rngs, (cfg.patch_dim, d), ("patch", "vision_embed"))
        self.patch_bias = param(rngs, (d,), ("norm",), "zeros")
        self.pos_embed = param(rngs, (cfg.num_position_embeddings, d), ("positions", "vision_embed"))
        self.blocks = stacked(cfg.depth, lambda r: VisionBlock(cfg, r), rngs)
        self.merger = PatchMerger(cfg, False, rngs)
        k = len(cfg.deepstack_visual_indexes)
        self.deepstack = stacked(k, lambda r: PatchMerger(cfg, True, r), rngs) if k else None

    def __call__(self, patches, segment_ids, pos_idx, pos_w, rowcol, *, dtype=jnp.float32, remat=False):
        cfg = self.cfg
        x = jnp.einsum("rsc,cd->rsd", patches.astype(dtype), self.patch_embed[...].astype(dtype))
        x = x + self.patch_bias[...].astype(dtype)
        table = self.pos_embed[...]
        pos = jnp.einsum("rstd,rst->rsd", table[pos_idx], pos_w)  # 4 bilinear taps
        x = constrain(x + pos.astype(dtype), ("batch", None, None))
        cos, sin = vision_cos_sin(rowcol, cfg.head_dim, cfg.rope_theta)
        def body(block, h, _):
            return block(h, cos, sin, segment_ids)

        # DeepStack taps split the depth into segments; each segment is one scan.
        taps = list(cfg.deepstack_visual_indexes)
        bounds = [0] + [t + 1 for t in taps] + [cfg.depth]
        graphdef, state = nnx.split(self.blocks)
        deep = []
        if taps:
            ds_graph, ds_state = nnx.split(self.deepstack)
        for seg, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
            if hi > lo:
                part = nnx.merge(graphdef, jax.tree.map(lambda a: a[lo:hi], state))
                x = scan_layers(part, body, x, remat=remat)
            if seg < len(taps):
                merger = nnx.merge(ds_graph, jax.tree.map(lambda a: a[seg], ds_state))
                deep.append(merger(x, cfg.merge_unit))
        merged = self.merger(x, cfg.merge_unit)
        deep = jnp.stack(deep) if deep else jnp.zeros((0,) + merged.shape, merged.dtype)
        return merged, deep
