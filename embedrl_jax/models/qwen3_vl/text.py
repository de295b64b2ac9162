"""Qwen3 decoder: RMSNorm, GQA attention with q/k norms and M-RoPE, SwiGLU MLP.

Weights are head-split so that tensor parallelism over heads needs no reshapes:
q [D, N, H], k/v [D, K, H], o [N, H, D]; einsum letters match the logical names
(b batch, t time, d embed, n heads, k kv heads, h head_dim, f mlp). The projections are
tokens-first (`btd,dnh->btnh`: a plain [BT, D] x [D, NH] matmul) and the activations are
swapped to heads-first [B, N, T, H] for attention: with a heads-first einsum XLA:CPU copied a
transposed weight in every layer of every decode step (and of every training step).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ...sharding import constrain
from .config import TextConfig
from .attention import Layout, attend
from .layers import linear, linear_param, param, rms_norm
from .rope import apply_rope


class DecoderLayer(nnx.Module):
    EQS = {
        "q": "btd,dnh->btnh", "k": "btd,dkh->btkh", "v": "btd,dkh->btkh", "o": "btnh,nhd->btd",
        "gate": "btd,df->btf", "up": "btd,df->btf", "down": "btf,fd->btd",
    }

    def __init__(self, cfg: TextConfig, rngs: nnx.Rngs, lora=None):
        d, n, k, h, f = (
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
            cfg.intermediate_size,
        )
        self.eps = cfg.rms_norm_eps
        self.lora = lora
        path = "layers"
        self.input_norm = param(rngs, (d,), ("norm",), "ones")
        linear_param(self, rngs, "q", (d, n, h), ("embed", "heads", "head_dim"), self.EQS["q"], lora, path)
        linear_param(self, rngs, "k", (d, k, h), ("embed", "kv_heads", "head_dim"), self.EQS["k"], lora, path)
        linear_param(self, rngs, "v", (d, k, h), ("embed", "kv_heads", "head_dim"), self.EQS["v"], lora, path)
        linear_param(self, rngs, "o", (n, h, d), ("heads", "head_dim", "embed"), self.EQS["o"], lora, path)
        self.q_norm = param(rngs, (h,), ("norm",), "ones")
        self.k_norm = param(rngs, (h,), ("norm",), "ones")
        self.post_norm = param(rngs, (d,), ("norm",), "ones")
        linear_param(self, rngs, "gate", (d, f), ("embed", "mlp"), self.EQS["gate"], lora, path)
        linear_param(self, rngs, "up", (d, f), ("embed", "mlp"), self.EQS["up"], lora, path)
        linear_param(self, rngs, "down", (f, d), ("mlp", "embed"), self.EQS["down"], lora, path)

    def _lin(self, name, x, rng):
        return linear(self, name, self.EQS[name], x, rng)

    def project_qkv(self, x, cos, sin, rng=None):
        y = rms_norm(x, self.input_norm[...], self.eps)
        q, k, v = (jnp.swapaxes(self._lin(n, y, rng), 1, 2) for n in ("q", "k", "v"))  # heads-first
        q = apply_rope(rms_norm(q, self.q_norm[...], self.eps), cos, sin)
        k = apply_rope(rms_norm(k, self.k_norm[...], self.eps), cos, sin)
        return q, k, v

    def finish(self, x, attn_out, rng=None):
        x = x + self._lin("o", jnp.swapaxes(attn_out, 1, 2), rng)
        y = rms_norm(x, self.post_norm[...], self.eps)
        y = self._lin("down", jax.nn.silu(self._lin("gate", y, rng)) * self._lin("up", y, rng), rng)
        return constrain(x + y, ("batch", "seq", None))

    def __call__(self, x, cos, sin, segments, rng=None, *, target, attention: str = "xla",
                 right_padded: bool = False):
        """`segments` [B, L] from `text_segments`; `attention` the config's kernel choice."""
        q, k, v = self.project_qkv(x, cos, sin, rng)
        layout = Layout(causal=True, right_padded=right_padded)
        out = attend(q, k, v, segments, segments, layout=layout, attention=attention, target=target)
        return self.finish(x, out, rng)


def text_segments(attention_mask):
    """[B, L] validity -> segment ids: 0 for real tokens, 1 for padding. With the causal mask a
    real token sees the real tokens before it; a padded position sees the padding before it and
    itself (never an empty row; its output is ignored downstream)."""
    return jnp.where(attention_mask > 0, 0, 1).astype(jnp.int32)
