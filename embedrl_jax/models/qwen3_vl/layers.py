"""Shared building blocks: parameter constructors with logical names, norms, attention."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

NEG_INF = -0.7 * float(jnp.finfo(jnp.float32).max)


def param(rngs: nnx.Rngs, shape, names, init: str = "normal", scale: float = 0.02) -> nnx.Param:
    """An nnx.Param carrying logical axis names (resolved to a mesh only in sharding.py)."""
    if init == "normal":
        value = scale * jax.random.normal(rngs.params(), shape, jnp.float32)
    elif init == "zeros":
        value = jnp.zeros(shape, jnp.float32)
    elif init == "ones":
        value = jnp.ones(shape, jnp.float32)
    else:
        raise ValueError(f"unknown init {init!r}")
    return nnx.Param(value, out_sharding=tuple(names))


def stacked(n: int, make, rngs: nnx.Rngs):
    """n copies of a module with a leading 'layers' axis on every parameter (for lax.scan)."""

    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def build(r):
        return make(r)

    return build(rngs)


def scan_layers(layers: nnx.Module, body, carry, xs=None, *, remat: bool = False):
    """lax.scan over a stacked module: body(layer_module, carry, x) -> carry."""
    graphdef, state = nnx.split(layers)

    def step(c, inputs):
        layer_state, x = inputs
        c = body(nnx.merge(graphdef, layer_state), c, x)
        return c, None

    if remat:
        step = jax.checkpoint(step, prevent_cse=False)
    carry, _ = jax.lax.scan(step, carry, (state, xs))
    return carry


def rms_norm(x, weight, eps):
    dtype = x.dtype
    x = x.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
    return weight.astype(dtype) * x.astype(dtype)


def layer_norm(x, weight, bias, eps):
    dtype = x.dtype
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + eps)
    return (y * weight.astype(jnp.float32) + bias.astype(jnp.float32)).astype(dtype)


def attention(q, k, v, mask):
    """Grouped-query attention.

    q [B, L, N, H], k/v [B, M, K, H] with N = K * G, mask broadcastable to [B, 1, 1, L, M]
    (True = attend). Scores and softmax in fp32; returns [B, L, N, H].
    """
    b, length, n, h = q.shape
    kv = k.shape[2]
    g = n // kv
    q = q.reshape(b, length, kv, g, h)
    scores = jnp.einsum("blkgh,bmkh->bkglm", q, k, preferred_element_type=jnp.float32)
    scores = scores * (h**-0.5)
    scores = jnp.where(mask, scores, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkglm,bmkh->blkgh", probs, v)
    return out.reshape(b, length, n, h)
