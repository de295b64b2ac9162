"""Qwen3 decoder: RMSNorm, GQA attention with q/k norms and M-RoPE, SwiGLU MLP.

Weights are head-split so that tensor parallelism over heads needs no reshapes:
q [D, N, H], k/v [D, K, H], o [N, H, D]; activations are heads-first
[B, N, T, H]; einsum letters match the logical names
(b batch, t time, d embed, n heads, k kv heads, h head_dim, f mlp).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ...sharding import constrain
from .config import TextConfig
from .layers import attention, param, rms_norm
from .rope import apply_rope


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: TextConfig, rngs: nnx.Rngs):
        d, n, k, h, f = (
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
            cfg.intermediate_size,
        )
        self.eps = cfg.rms_norm_eps
        self.input_norm = param(rngs, (d,), ("norm",), "ones")
        self.q = param(rngs, (d, n, h), ("embed", "heads", "head_dim"))
        self.k = param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"))
        self.v = param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"))
        self.o = param(rngs, (n, h, d), ("heads", "head_dim", "embed"))
        self.q_norm = param(rngs, (h,), ("norm",), "ones")
        self.k_norm = param(rngs, (h,), ("norm",), "ones")
        self.post_norm = param(rngs, (d,), ("norm",), "ones")
        self.gate = param(rngs, (d, f), ("embed", "mlp"))
        self.up = param(rngs, (d, f), ("embed", "mlp"))
        self.down = param(rngs, (f, d), ("mlp", "embed"))

    def project_qkv(self, x, cos, sin):
        dt = x.dtype
        y = rms_norm(x, self.input_norm[...], self.eps)
        q = jnp.einsum("btd,dnh->bnth", y, self.q[...].astype(dt))
        k = jnp.einsum("btd,dkh->bkth", y, self.k[...].astype(dt))
        v = jnp.einsum("btd,dkh->bkth", y, self.v[...].astype(dt))
        q = apply_rope(rms_norm(q, self.q_norm[...], self.eps), cos, sin)
        k = apply_rope(rms_norm(k, self.k_norm[...], self.eps), cos, sin)
        return q, k, v

    def finish(self, x, attn_out):
        dt = x.dtype
        x = x + jnp.einsum("bnth,nhd->btd", attn_out, self.o[...].astype(dt))
        y = rms_norm(x, self.post_norm[...], self.eps)
        g = jnp.einsum("btd,df->btf", y, self.gate[...].astype(dt))
        u = jnp.einsum("btd,df->btf", y, self.up[...].astype(dt))
        y = jnp.einsum("btf,fd->btd", jax.nn.silu(g) * u, self.down[...].astype(dt))
        return constrain(x + y, ("batch", "seq", None))

    def __call__(self, x, cos, sin, mask):
        q, k, v = self.project_qkv(x, cos, sin)
        return self.finish(x, attention(q, k, v, *mask))


def causal_mask(attention_mask):
    """[B, L] validity -> (q_seg, k_seg, q_idx, k_idx) for causal, key-valid attention."""
    b, length = attention_mask.shape
    idx = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
    return jnp.zeros((b, length), jnp.int32), jnp.where(attention_mask > 0, 0, -1), idx, idx
