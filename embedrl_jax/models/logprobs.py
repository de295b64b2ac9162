"""Token log-probs from hidden states and an LM head, in fp32, chunked over the vocabulary.

Model-layer code: the sampler's layout (`reason.sequences.completion_logprobs`), the SFT loss and
the GRPO passes all score tokens with this one function (`rl.token_logprobs` re-exports it).

Precision is asked for explicitly, since a TPU matmul of fp32 operands at the default
precision is a single bf16 pass: bf16 (or fp16) hidden states meet the LM head cast to the same
dtype with fp32 accumulation (`preferred_element_type`) — products of bf16 values are exact in
fp32, so nothing is lost and the matmul stays one pass; fp32 hidden states use fp32 operands at
`Precision.HIGHEST`. The sampler's next-token logits (`qwen3_vl.decode.Decoder`) use the same
rule (`head_operands`), so sampled and recomputed log-probs differ only by the forward passes'
own rounding.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["token_logprobs", "head_operands"]

LOW_PRECISION = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def head_operands(dtype, precision=None):
    """(operand dtype, precision) of an LM-head matmul whose accuracy matters (log-probs, the
    sampler's next-token logits), for hidden states in `dtype`: bf16/fp16 operands as they are
    (exact products, fp32 accumulation via preferred_element_type), otherwise fp32 operands at
    `Precision.HIGHEST` (a TPU's default for fp32 is one bf16 pass). An explicit `precision` wins."""
    if jnp.dtype(dtype) in LOW_PRECISION:
        return jnp.dtype(dtype), precision
    return jnp.dtype(jnp.float32), lax.Precision.HIGHEST if precision is None else precision


def token_logprobs(hidden, lm_head_kernel, targets, *, chunk_size: int = 4096, precision=None):
    """fp32 log-probs of ``targets`` and per-token entropy, chunked over the vocabulary.

    ``hidden [..., D]``, ``lm_head_kernel [D, V]``, ``targets [...]`` (ints in ``[0, V)``).
    Returns ``(logp, entropy)``, both ``[...]`` float32.

    Why chunked: with V = 151,936 the full ``[B, T, V]`` fp32 logits dwarf everything else.
    A scan walks over vocabulary chunks keeping, per token, a running max ``m``, ``s = sum
    exp(z - m)``, ``w = sum exp(z - m) (z - m)`` and the target logit; at the end
    ``logsumexp = m + log s`` and ``entropy = log s - w / s``.  The chunk body is
    rematerialised (``jax.checkpoint``) so the backward pass also holds one chunk at a time.
    If V is not a multiple of the chunk, the last slice is shifted back to end at V and the
    columns it shares with the previous chunk are masked, so the kernel is never padded/copied.
    The running max is stop-gradiented: the result does not depend on it mathematically, so
    gradients stay exact.  Targets outside ``[0, V)`` (padding) give finite junk; mask them.
    ``precision``: None chooses per `head_operands` (see the module docstring).
    """
    d_model, vocab = lm_head_kernel.shape
    if hidden.shape[-1] != d_model:
        raise ValueError(f"hidden last dim {hidden.shape[-1]} != lm_head_kernel rows {d_model}")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"targets shape {targets.shape} != hidden leading shape {hidden.shape[:-1]}")
    chunk = int(min(int(chunk_size), vocab))
    if chunk < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    n_chunks = math.ceil(vocab / chunk)

    lead = hidden.shape[:-1]
    op_dtype, precision = head_operands(hidden.dtype, precision)
    h = hidden.reshape(-1, d_model).astype(op_dtype)
    tgt = targets.reshape(-1).astype(jnp.int32)

    def chunk_stats(h, kernel, tgt, idx):
        nominal = idx * chunk
        start = jnp.minimum(nominal, vocab - chunk)
        w = lax.dynamic_slice_in_dim(kernel, start, chunk, axis=1).astype(op_dtype)
        z = jnp.dot(h, w, precision=precision, preferred_element_type=jnp.float32)
        cols = start + jnp.arange(chunk, dtype=jnp.int32)
        fresh = cols >= nominal  # columns not already covered by the previous chunk
        m = lax.stop_gradient(jnp.max(jnp.where(fresh, z, -jnp.inf), axis=1))
        shifted = jnp.where(fresh, z - m[:, None], 0.0)
        e = jnp.where(fresh, jnp.exp(shifted), 0.0)
        s = jnp.sum(e, axis=1)
        wsum = jnp.sum(e * shifted, axis=1)
        hit = fresh & (cols[None, :] == tgt[:, None])
        tz = jnp.sum(jnp.where(hit, z, 0.0), axis=1)
        return m, s, wsum, tz

    chunk_stats = jax.checkpoint(chunk_stats)

    def combine(carry, new):
        m0, s0, w0, t0 = carry
        m1, s1, w1, t1 = new
        m = jnp.maximum(m0, m1)
        d0, d1 = m0 - m, m1 - m
        a0, a1 = jnp.exp(d0), jnp.exp(d1)
        return (m, a0 * s0 + a1 * s1, a0 * (w0 + d0 * s0) + a1 * (w1 + d1 * s1), t0 + t1)

    carry = chunk_stats(h, lm_head_kernel, tgt, jnp.int32(0))
    if n_chunks > 1:

        def body(carry, idx):
            return combine(carry, chunk_stats(h, lm_head_kernel, tgt, idx)), None

        carry, _ = lax.scan(body, carry, jnp.arange(1, n_chunks, dtype=jnp.int32))

    m, s, wsum, tz = carry
    log_s = jnp.log(s)
    logp = tz - (m + log_s)
    entropy = log_s - wsum / s
    return logp.reshape(lead), entropy.reshape(lead)
