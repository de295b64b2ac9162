"""Prompt + completion sequences for the Reasoner: one layout for sampling, SFT and GRPO.

Prompts are left-padded so every prompt ends at column P - 1 and its completion occupies
columns P .. P + T - 1 (flush: the hidden state at column P - 1 + t predicts completion token
t). Completion token t of a row sits at M-RoPE position ``n_valid + t + rope_delta`` on all
three axes, the position the KV-cache sampler gave it, so the training forward scores exactly
the sequence that was sampled. Several prompt batches can be stacked to one shape (GRPO
mini-batches, SFT micro-batches) with their own packed vision rows.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from ..models.logprobs import token_logprobs
from ..models.qwen3_vl.inputs import Buckets, Shape, batches_shape, pack_inputs

__all__ = ["pack_prompts", "left_pad", "repeat_samples", "with_completions", "completion_logprobs"]


def left_pad(arrays: Mapping[str, np.ndarray], pad: int) -> dict[str, np.ndarray]:
    """Shift the text arrays of a packed batch right by `pad` columns (vision arrays untouched)."""
    out = dict(arrays)
    if pad <= 0:
        return out
    out["input_ids"] = np.pad(arrays["input_ids"], ((0, 0), (pad, 0)))
    out["attention_mask"] = np.pad(arrays["attention_mask"], ((0, 0), (pad, 0)))
    out["visual_index"] = np.pad(arrays["visual_index"], ((0, 0), (pad, 0)), constant_values=-1)
    out["positions"] = np.pad(arrays["positions"], ((0, 0), (0, 0), (pad, 0)))
    return out


def pack_prompts(cfg, batches: Sequence[Mapping[str, np.ndarray]], buckets: Buckets = Buckets(),
                 *, shape: Shape | None = None) -> tuple[list[dict[str, np.ndarray]], list[np.ndarray]]:
    """Left-padded transformers-named prompt batches -> packed arrays of one shape each.

    Every batch is packed at its own length, then left-padded to the common bucketed length,
    and its vision rows are padded to the common (rows, row_len) -- or both come from `shape`
    -- so the results can be stacked. Returns (arrays per batch, rope deltas per batch).
    """
    batches = [{k: np.asarray(v) for k, v in b.items() if v is not None} for b in batches]
    longest = max(b["input_ids"].shape[1] for b in batches)
    seq, vision = batches_shape(cfg, batches, buckets) if shape is None else shape
    if seq < longest:
        raise ValueError(f"prompt of {longest} tokens does not fit the padded length {seq}")
    out, deltas = [], []
    for b in batches:
        length = b["input_ids"].shape[1]
        arrays, info = pack_inputs(cfg, **b, pad_to=length, buckets=buckets, vision=vision)
        out.append(left_pad(arrays, seq - length))
        deltas.append(np.asarray(info["rope_deltas"], np.int32))
    return out, deltas


def repeat_samples(arrays: Mapping[str, np.ndarray], deltas: np.ndarray, n: int):
    """n consecutive copies of every prompt row; vision rows are shared, not copied."""
    out = dict(arrays)
    if n > 1:
        for k, axis in (("input_ids", 0), ("attention_mask", 0), ("visual_index", 0), ("positions", 1)):
            out[k] = np.repeat(arrays[k], n, axis=axis)
        deltas = np.repeat(deltas, n)
    return out, deltas


def with_completions(arrays: Mapping[str, np.ndarray], deltas: np.ndarray, tokens: np.ndarray,
                     mask: np.ndarray) -> dict[str, np.ndarray]:
    """Packed left-padded prompts [R, P] + completions [R, T] -> sequence arrays [R, P + T].

    `mask` marks the completion tokens that exist (EOS included); later slots are padding and
    become invalid keys. Positions continue each prompt as the sampler does.
    """
    tokens = np.asarray(tokens, np.int32)
    mask = np.asarray(mask).astype(bool)
    r, p = arrays["input_ids"].shape
    if tokens.shape[0] != r or tokens.shape != mask.shape:
        raise ValueError(f"completions {tokens.shape} / mask {mask.shape} do not match {r} prompt rows")
    t = tokens.shape[1]
    n_valid = arrays["attention_mask"].sum(-1).astype(np.int32)
    pos = n_valid[:, None] + np.arange(t, dtype=np.int32)[None, :] + np.asarray(deltas, np.int32)[:, None]
    out = dict(arrays)
    out["input_ids"] = np.concatenate([arrays["input_ids"], np.where(mask, tokens, 0)], axis=1).astype(np.int32)
    out["attention_mask"] = np.concatenate([arrays["attention_mask"], mask.astype(np.int32)], axis=1)
    out["visual_index"] = np.concatenate([arrays["visual_index"], np.full((r, t), -1, np.int32)], axis=1)
    out["positions"] = np.concatenate([arrays["positions"], np.broadcast_to(pos[None], (3, r, t))], axis=2).astype(np.int32)
    return out


def completion_logprobs(mdef, params, seq: Mapping[str, jnp.ndarray], n_new: int, *, dtype=jnp.float32,
                        remat: bool | str | None = False, rng=None, chunk_size: int = 4096, target=None):
    """(logp [R, T], entropy [R, T]) fp32 of the last `n_new` tokens of a `with_completions` batch.

    One function for the policy, old-policy and reference passes (and SFT): the vocabulary is
    walked in chunks, so the [R, T, V] logits never exist.
    """
    model = mdef.module(params)
    hidden = model(seq, dtype=dtype, remat=remat, rng=rng, target=target)
    length = seq["input_ids"].shape[1]
    start = length - n_new
    h = hidden[:, start - 1:length - 1]
    return token_logprobs(h, model.head_kernel(), seq["input_ids"][:, start:], chunk_size=chunk_size)
