"""The sampling loop and the token choice (greedy or sampled), in one jitted function, static shapes.

The model owns decoding (`ModelDef.decoder`: prefill and one KV-cache decode step, see
`models/qwen3_vl/decode.py`); this module runs its loop for `max_new_tokens` steps, picks each
token (greedy first maximum, or temperature / top-k / top-p sampling) and stops rows at EOS.
The layer loop and the cache layout follow the target platform (the mesh in the sharding
context), unless `layer_loop` names one.

Precision: the forward runs in `dtype` and the KV cache is held in it too (bf16 on accelerators:
half the cache memory, and the same rounding as the trainer's bf16 scoring forward, so sampled
and recomputed log-probs agree to the bound tests/test_precision.py measures). A trainer passes
its `compute_dtype`; None takes the dtype of the embedding table (a frozen model's weights: a
judge or a standalone Reasoner computes in the dtype it was loaded in). The next-token logits
are the trainer's log-prob products (`models.logprobs.head_operands`: bf16 operands with fp32
accumulation in bf16 mode); log-softmax and sampling are fp32.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from ..models.platform import current_target


def default_layer_loop() -> str:
    """The decode layer loop of the current target: "unrolled" on XLA:CPU, "scan" on accelerators
    (`Target.decode_layer_loop`)."""
    return current_target().decode_layer_loop


def generate_tokens(mdef, params, batch, rope_deltas, key, *, max_new_tokens: int, eos_ids: tuple[int, ...],
                    temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, dtype=None,
                    layer_loop: str | None = None):
    """(tokens [B, N], logprobs [B, N] fp32, mask [B, N]) for a left-padded packed batch.

    `dtype`: compute and KV-cache dtype (None: the embedding table's, see the module docstring);
    `layer_loop`: "scan", "unrolled" or None (the target's; see `default_layer_loop`).
    """
    b, p_len = batch["input_ids"].shape
    dtype = jnp.dtype(params["embed"].dtype if dtype is None else dtype)
    decoder = mdef.decoder(params, dtype=dtype, layer_loop=layer_loop)
    logits, cache = decoder.prefill(batch, rope_deltas, p_len + max_new_tokens)

    def first_max(x):
        """argmax as max + smallest matching index: the same first-maximum index, ~3x faster
        than XLA:CPU's variadic argmax reduce over a 150k vocabulary."""
        hit = x == jnp.max(x, axis=-1, keepdims=True)
        idx = jnp.min(jnp.where(hit, jnp.arange(x.shape[-1], dtype=jnp.int32), x.shape[-1]), axis=-1)
        return jnp.minimum(idx, x.shape[-1] - 1)  # all-NaN rows: a valid id, not V

    def pick(logits, k):
        lse = jax.nn.logsumexp(logits, axis=-1)
        if temperature <= 0:
            tok = first_max(logits)
        else:
            scaled = logits / temperature
            if top_k:
                kth = jax.lax.top_k(scaled, min(top_k, scaled.shape[-1]))[0][:, -1:]
                scaled = jnp.where(scaled < kth, -jnp.inf, scaled)
            if top_p < 1.0:
                order = jnp.sort(scaled, axis=-1)[:, ::-1]
                cum = jnp.cumsum(jax.nn.softmax(order, axis=-1), axis=-1)
                cutoff = jnp.take_along_axis(order, jnp.sum(cum < top_p, axis=-1, keepdims=True), axis=-1)
                scaled = jnp.where(scaled < cutoff, -jnp.inf, scaled)
            tok = jax.random.categorical(k, scaled, axis=-1)
        tok = tok.astype(jnp.int32)
        return tok, jnp.take_along_axis(logits, tok[:, None], axis=-1)[:, 0] - lse

    eos = jnp.asarray(eos_ids, jnp.int32)

    def step(t, carry):
        cache, logits, done, toks, lps, mask = carry
        tok, lp = pick(logits, jax.random.fold_in(key, t))
        live = ~done
        toks = toks.at[:, t].set(jnp.where(live, tok, 0))
        lps = lps.at[:, t].set(jnp.where(live, lp, 0.0))
        mask = mask.at[:, t].set(live)
        done = done | (live & jnp.isin(tok, eos))
        logits, cache = decoder.step(cache, tok)
        return cache, logits, done, toks, lps, mask

    n = max_new_tokens
    init = (cache, logits, jnp.zeros((b,), bool),
            jnp.zeros((b, n), jnp.int32), jnp.zeros((b, n), jnp.float32), jnp.zeros((b, n), bool))
    out = jax.lax.fori_loop(0, n, step, init)
    return out[3], out[4], out[5]


def _check(max_new_tokens, temperature, top_k, top_p) -> None:
    if isinstance(max_new_tokens, bool) or int(max_new_tokens) != max_new_tokens or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature!r}")
    if int(top_k) != top_k or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0 (0 disables it), got {top_k!r}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")


def jitted_generate(mdef, max_new_tokens, eos_ids, temperature, top_k, top_p, layer_loop: str | None = None,
                    dtype=None):
    """The jitted `generate_tokens` for these static settings (cached; bad settings raise ValueError);
    `layer_loop` None follows the target the call is traced for (the mesh in the sharding context);
    `dtype` None computes in the dtype of the weights passed (see `generate_tokens`)."""
    _check(max_new_tokens, temperature, top_k, top_p)
    if layer_loop not in (None, "scan", "unrolled"):
        raise ValueError(f"layer_loop must be 'scan', 'unrolled' or None, got {layer_loop!r}")
    if dtype is not None:
        dtype = jnp.dtype(dtype).name
        if dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16, float16 or None, got {dtype!r}")
    return _jitted(mdef, int(max_new_tokens), tuple(eos_ids), float(temperature), int(top_k), float(top_p), layer_loop,
                   dtype)


@functools.lru_cache(maxsize=16)
def _jitted(mdef, max_new_tokens, eos_ids, temperature, top_k, top_p, layer_loop, dtype):
    return jax.jit(functools.partial(generate_tokens, mdef, max_new_tokens=max_new_tokens, eos_ids=eos_ids,
                                     temperature=temperature, top_k=top_k, top_p=top_p, layer_loop=layer_loop,
                                     dtype=dtype))
