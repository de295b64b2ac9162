"""Shared building blocks: parameter constructors with logical names, norms, the layer loop.
(Attention lives in `models/qwen3_vl/attention.py`.)"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ...lora import LORA_A, LORA_B, adapter_shapes, lora_einsum
from ..platform import Target, remat_policy

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


def linear_param(module, rngs, name, shape, names, eq, lora, path):
    """A linear weight `name` used as einsum(eq, x, w), with LoRA adapters when `path/name` is targeted."""
    setattr(module, name, param(rngs, shape, names))
    if lora is not None and lora.matches(f"{path}/{name}"):
        (a_shape, a_names), (b_shape, b_names) = adapter_shapes(eq, shape, names, lora.rank)
        fan_in = int(np.prod(a_shape[:-1]))
        setattr(module, name + LORA_A, param(rngs, a_shape, a_names, "normal", scale=fan_in**-0.5))
        setattr(module, name + LORA_B, param(rngs, b_shape, b_names, "zeros"))


def linear(module, name, eq, x, rng=None):
    """einsum(eq, x, module.<name>) plus its LoRA path when the module has adapters."""
    a = getattr(module, name + LORA_A, None)
    b = getattr(module, name + LORA_B, None)
    lora = module.lora
    return lora_einsum(
        eq, x, getattr(module, name)[...], None if a is None else a[...], None if b is None else b[...],
        scale=lora.scale if lora else 0.0, dropout=lora.dropout if lora else 0.0, rng=rng, name=name,
        merge=getattr(module, "CONTRACT_2D", True),
    )


def stacked(n: int, make, rngs: nnx.Rngs):
    """n copies of a module with a leading 'layers' axis on every parameter (for lax.scan)."""

    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def build(r):
        return make(r)

    return build(rngs)


def scan_layers(layers: nnx.Module, body, carry, xs=None, *, target: Target, remat: bool | str | None = False):
    """lax.scan over a stacked module: body(layer_module, carry, x) -> carry.

    The target decides rolled or unrolled (`Target.unroll_layers`); `remat` is a policy name
    (`platform.remat_policy`), applied per layer."""
    graphdef, state = nnx.split(layers)

    def step(c, inputs):
        layer_state, x = inputs
        c = body(nnx.merge(graphdef, layer_state), c, x)
        return c, None

    checkpoint, policy = remat_policy(remat, target)
    if checkpoint:
        step = jax.checkpoint(step, prevent_cse=False, policy=policy)
    carry, _ = jax.lax.scan(step, carry, (state, xs), unroll=target.unroll_layers)
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

