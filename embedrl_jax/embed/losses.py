"""Contrastive losses for the Embedder: global symmetric InfoNCE and GradCache.

Everything here is a pure function of arrays, jit-able, and works unchanged on *global*
arrays sharded over the mesh: ``q @ p.T`` inside jit makes GSPMD all-gather the columns,
so the negatives are the whole global batch without hand-written collectives (method
reference §6.1, practice notes §8).

Conventions
-----------
* ``q`` and ``p`` are ``[B, D]`` embeddings, **already L2-normalised** (the Embedder's
  pooling normalises; normalising again here would hide a missing normalisation upstream
  and change the gradient the tower sees).  Row ``i`` of ``q`` and row ``i`` of ``p`` are a
  pair; every other row of the other side is an in-batch negative.
* Similarities and logits are float32 with ``Precision.HIGHEST``: at scale 50 a bf16
  similarity error of 1e-3 moves a logit by 0.05, which is not noise for a softmax.
* GradCache chunks are *strided*: chunk ``c`` holds rows ``c, c + n, c + 2n, …`` of the
  global batch (``n`` = number of chunks).  With the batch sharded in contiguous blocks
  over ``("data", "fsdp")``, every chunk then spans every device, so each chunk step is
  data-parallel and needs no resharding.  Which rows share a chunk does not change the
  result: the loss is always taken on the full global embeddings.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax

from embedrl_jax.sharding import constrain

__all__ = [
    "DEFAULT_SCALE",
    "MAX_SCALE",
    "similarity",
    "logit_scale_param",
    "info_nce",
    "embed_in_chunks",
    "grad_cache",
]

DEFAULT_SCALE = 50.0
"""Embed-RL's fixed logit scale (temperature 0.02)."""

MAX_SCALE = 100.0
"""Upper clip for a learned scale (as in CLIP): keeps the softmax from collapsing to argmax."""

_TOWER_INDEX = {"q": 0, "p": 1, "n": 2}
"""``rng`` is folded with these per tower, then with the chunk index (see ``grad_cache``)."""


# --------------------------------------------------------------------------------------------
# InfoNCE
# --------------------------------------------------------------------------------------------


def similarity(a: jax.Array, b: jax.Array) -> jax.Array:
    """Cosine-similarity matrix ``a @ b.T`` in float32, rows kept on the batch axis.

    Why: one place fixes dtype and precision for every contrastive logit, and the row
    constraint keeps each device's queries local while GSPMD gathers the columns.
    """
    s = jnp.einsum(
        "bd,cd->bc",
        a.astype(jnp.float32),
        b.astype(jnp.float32),
        precision=lax.Precision.HIGHEST,
        preferred_element_type=jnp.float32,
    )
    return constrain(s, ("batch", None))


def logit_scale_param(log_scale: jax.Array, *, max_scale: float = MAX_SCALE) -> jax.Array:
    """Learnable logit scale: ``exp(log_scale)`` clipped to ``max_scale``.

    Why: optimising the log keeps the scale positive and its updates multiplicative; the
    clip bounds the sharpness.  The clip is applied to ``log_scale`` so the gradient is
    exactly zero above the bound instead of flowing into an ignored value.  Initialise
    ``log_scale = log(DEFAULT_SCALE)`` to start at Embed-RL's fixed value.
    """
    log_scale = jnp.asarray(log_scale, jnp.float32)
    return jnp.exp(jnp.minimum(log_scale, math.log(max_scale)))


def _masked_mean(x: jax.Array, valid: jax.Array, empty: float) -> jax.Array:
    """Mean of ``x`` over ``valid`` entries, ``empty`` when there are none (no NaN metrics)."""
    n = jnp.sum(valid)
    total = jnp.sum(jnp.where(valid, x, 0.0))
    return jnp.where(n > 0, total / jnp.maximum(n, 1), jnp.float32(empty))


def info_nce(
    q: jax.Array,
    p: jax.Array,
    *,
    scale: float | jax.Array = DEFAULT_SCALE,
    hard_negatives: jax.Array | None = None,
    hard_negative_mask: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Symmetric InfoNCE over the global batch: ``½[CE(s·Q·Pᵀ, i) + CE(s·P·Qᵀ, j)]``.

    Why: this is Embed-RL's loss (§6.1).  Both directions average over the *global* batch,
    which equals the reference's per-rank rows + all-gather-with-grad + DDP mean.  There
    are no q–q or p–p terms.

    Args:
      q, p: ``[B, D]`` L2-normalised query / positive embeddings (any float dtype; the
        loss runs in float32).  Not normalised here, by design (see module docstring).
      scale: logit scale, a Python float or a traced scalar (e.g. from
        ``logit_scale_param``); gradients flow into it when traced.
      hard_negatives: optional explicit negatives, ``[B, K, D]`` (or a flat pool
        ``[M, D]``), also L2-normalised.  They are **global**: all ``B·K`` of them become
        extra columns for *every* query, in the query→positive direction only (the
        positive→query direction still sees just the queries).  Global, because a hard
        negative of one query is at least as informative for its same-task neighbours,
        and it keeps the logits a plain ``[B, B + B·K]`` matrix on the sharded batch.
      hard_negative_mask: optional ``[B, K]`` (or ``[M]``) validity mask; invalid
        negatives are removed from every row (logit −inf), so padding costs nothing.

    Returns:
      ``(loss, metrics)``; metrics are float32 scalars:
      ``loss``, ``loss_q2p``, ``loss_p2q``; ``acc_q2p`` / ``acc_p2q``, the fraction of rows
      whose argmax is the positive (first index wins ties, as ``np.argmax``; q→p counts
      hard-negative columns); ``pos_sim``, the mean positive cosine; ``hardest_neg_sim``,
      the mean over queries of their highest-scoring negative cosine (in-batch or valid
      hard negative; queries with no negative are skipped, −1 if none has one); ``scale``.
    """
    if q.ndim != 2 or q.shape != p.shape:
        raise ValueError(f"q and p must both be [B, D] with equal shapes, got {q.shape} and {p.shape}")
    if hard_negative_mask is not None and hard_negatives is None:
        raise ValueError("hard_negative_mask was given without hard_negatives")
    b = q.shape[0]
    scale = jnp.asarray(scale, jnp.float32)
    eye = jnp.eye(b, dtype=bool)

    sim = similarity(q, p)  # [B, B]: sim[i, j] = q_i · p_j
    pos = jnp.diagonal(sim)
    logits = scale * sim

    # positive -> query: column j of Q·Pᵀ is p_j against every query.
    loss_p2q = jnp.mean(jax.nn.logsumexp(logits, axis=0) - scale * pos)
    acc_p2q = jnp.mean(jnp.argmax(logits, axis=0) == jnp.arange(b))

    # query -> positive: row i, optionally widened with every valid hard negative.
    row_logits = logits
    neg_sim = jnp.where(eye, -jnp.inf, sim)
    if hard_negatives is not None:
        hn = _flat_negatives(hard_negatives, b, q.shape[1])
        hn_sim = similarity(q, hn)  # [B, M]
        if hard_negative_mask is None:
            valid = jnp.ones((hn.shape[0],), bool)
        else:
            valid = jnp.asarray(hard_negative_mask).astype(bool).reshape(-1)
            if valid.shape[0] != hn.shape[0]:
                raise ValueError(f"hard_negative_mask has {valid.shape[0]} entries for {hn.shape[0]} hard negatives")
        # mask after scaling: scale · (−inf) would be NaN for scale 0
        row_logits = jnp.concatenate([logits, jnp.where(valid[None, :], scale * hn_sim, -jnp.inf)], axis=1)
        neg_sim = jnp.concatenate([neg_sim, jnp.where(valid[None, :], hn_sim, -jnp.inf)], axis=1)
    loss_q2p = jnp.mean(jax.nn.logsumexp(row_logits, axis=1) - scale * pos)
    acc_q2p = jnp.mean(jnp.argmax(row_logits, axis=1) == jnp.arange(b))

    hardest = jnp.max(neg_sim, axis=1)
    loss = 0.5 * (loss_q2p + loss_p2q)
    metrics = {
        "loss": loss,
        "loss_q2p": loss_q2p,
        "loss_p2q": loss_p2q,
        "acc_q2p": acc_q2p.astype(jnp.float32),
        "acc_p2q": acc_p2q.astype(jnp.float32),
        "pos_sim": jnp.mean(pos),
        "hardest_neg_sim": _masked_mean(hardest, jnp.isfinite(hardest), empty=-1.0),
        "scale": scale,
    }
    return loss, metrics


def _flat_negatives(hn: jax.Array, b: int, d: int) -> jax.Array:
    """``[B, K, D]`` or ``[M, D]`` hard negatives as a flat ``[M, D]`` column pool."""
    if hn.ndim == 3 and hn.shape[0] == b and hn.shape[2] == d:
        return hn.reshape(b * hn.shape[1], d)
    if hn.ndim == 2 and hn.shape[1] == d:
        return hn
    raise ValueError(f"hard_negatives must be [B={b}, K, D={d}] or [M, D={d}], got {hn.shape}")


# --------------------------------------------------------------------------------------------
# GradCache
# --------------------------------------------------------------------------------------------


def _leading_dim(batch) -> int:
    dims = {x.shape[0] for x in jax.tree.leaves(batch)}
    if len(dims) != 1:
        raise ValueError(f"batch leaves must share one leading batch dim, got {sorted(dims)}")
    return dims.pop()


def _to_chunks(batch, num_chunks: int):
    """``[B, …]`` leaves -> ``[n, B/n, …]``, chunk ``c`` = rows ``c, c+n, …`` (strided).

    Why strided: see the module docstring; contiguous chunks would put a whole chunk on
    one device and serialise the data-parallel work.
    """
    b = _leading_dim(batch)
    if b % num_chunks:
        raise ValueError(f"batch size {b} is not divisible by num_chunks={num_chunks}")

    def split(x):
        return jnp.moveaxis(x.reshape(b // num_chunks, num_chunks, *x.shape[1:]), 1, 0)

    return jax.tree.map(split, batch)


def _from_chunks(x: jax.Array) -> jax.Array:
    """Inverse of ``_to_chunks`` for one ``[n, B/n, …]`` array."""
    n, m = x.shape[:2]
    return jnp.moveaxis(x, 0, 1).reshape(n * m, *x.shape[2:])


def _call(embed_fn, params, chunk, rng, index):
    """Run ``embed_fn`` on one chunk, with that chunk's key when an rng is in play."""
    if rng is None:
        out = embed_fn(params, chunk)
    else:
        out = embed_fn(params, chunk, jax.random.fold_in(rng, index))
    if out.ndim != 2:
        raise ValueError(f"embed_fn must return [b, D] embeddings, got shape {out.shape}")
    return constrain(out, ("batch", None))


def embed_in_chunks(embed_fn: Callable, params, batch, *, num_chunks: int, rng: jax.Array | None = None) -> jax.Array:
    """Embed a ``[B, …]`` batch pytree ``num_chunks`` strided chunks at a time -> ``[B, D]``.

    Why: GradCache's first pass, and a memory-bounded embedding pass on its own (eval).
    ``lax.scan`` keeps one chunk's activations live, whatever ``num_chunks`` is.  This
    function is differentiable (the gradient stores every chunk's activations);
    ``grad_cache`` wraps it in ``stop_gradient``.  With ``rng``, chunk ``c`` is embedded
    as ``embed_fn(params, chunk, fold_in(rng, c))``.
    """
    chunks = _to_chunks(batch, num_chunks)

    def body(_, xs):
        chunk, index = xs
        return None, _call(embed_fn, params, chunk, rng, index)

    _, out = lax.scan(body, None, (chunks, jnp.arange(num_chunks)))
    return _from_chunks(out)


def _pullback_in_chunks(embed_fn, params, batch, cotangent, acc, *, num_chunks, rng):
    """GradCache's third pass for one tower: ``acc + Σ_c vjp(embed_fn on chunk c)(g_c)``.

    Why: re-running each chunk's forward under ``jax.vjp`` bounds activation memory to
    one chunk, and pulling back the cached ``dL/d(emb)`` slice gives exactly that chunk's
    share of the global-batch gradient.
    """
    chunks = _to_chunks(batch, num_chunks)
    g_chunks = _to_chunks(cotangent, num_chunks)

    def body(acc, xs):
        chunk, g, index = xs
        out, pull = jax.vjp(lambda prm: _call(embed_fn, prm, chunk, rng, index), params)
        (g_params,) = pull(g.astype(out.dtype))
        return jax.tree.map(lambda a, gp: a + gp.astype(a.dtype), acc, g_params), None

    acc, _ = lax.scan(body, acc, (chunks, g_chunks, jnp.arange(num_chunks)))
    return acc


def grad_cache(
    embed_fn: Callable,
    params,
    q_batch,
    p_batch,
    *,
    num_chunks: int,
    loss_fn: Callable = info_nce,
    n_batch=None,
    rng: jax.Array | None = None,
    loss_params=None,
    **loss_kw: Any,
):
    """Global-batch contrastive gradient with one chunk of activations in memory.

    Why: gradient accumulation over micro-batches shrinks the negative pool (each
    micro-batch only sees its own negatives); GradCache keeps the *global* loss and
    still bounds activation memory (practice notes §8).  Three passes:

    1. embed every chunk without gradient (``stop_gradient`` over ``embed_in_chunks``)
       to get the global ``Q``, ``P`` (and hard negatives ``N``);
    2. take the loss and ``g = dL/d(Q, P, N)`` on those global embeddings;
    3. for each chunk, re-run the forward under ``jax.vjp`` and pull back that chunk's
       slice of ``g`` (``lax.scan`` over chunks), summing the parameter gradients.

    Jit with ``embed_fn``, ``num_chunks`` and ``loss_fn`` static (e.g. via
    ``functools.partial``).  The result equals ``jax.grad`` of the loss on the same
    embeddings, up to float summation order.

    Args:
      embed_fn: ``embed_fn(params, chunk) -> [b, D]``, or ``embed_fn(params, chunk, key)``
        when ``rng`` is given.  The same function embeds queries, positives and negatives.
      params: parameter pytree (floating leaves) that receives gradients.
      q_batch, p_batch: batch pytrees with a leading global batch dim ``B`` divisible by
        ``num_chunks``.
      num_chunks: static number of chunks per tower.
      loss_fn: ``loss_fn(Q, P, **kw) -> (loss, metrics)``; defaults to ``info_nce``.
      n_batch: optional hard-negative inputs, leaves ``[B, K, …]``; embedded like the
        others (flattened to ``B·K`` rows) and passed on as ``hard_negatives=[B, K, D]``,
        so they receive gradients too.  Pass a fixed ``[B, K, D]`` array through
        ``loss_kw`` instead for constant negatives.
      rng: optional key for stochastic forwards (dropout).  Chunk ``c`` of tower ``t``
        (``q``=0, ``p``=1, ``n``=2) is called with ``fold_in(fold_in(rng, t), c)`` in both
        pass 1 and pass 3, so the recomputed forward is bit-identical to the cached one
        and the pulled-back gradient belongs to the embeddings the loss saw.  (Masks
        therefore depend on ``num_chunks``: the result matches a plain gradient that
        embeds with the same per-chunk keys, e.g. through ``embed_in_chunks``.)
      loss_params: optional pytree of loss-side parameters (e.g. ``{"log_scale": x}``
        with a ``loss_fn`` that maps it through ``logit_scale_param``), passed to
        ``loss_fn`` as keyword arguments and differentiated in pass 2.
      **loss_kw: further constant keyword arguments for ``loss_fn`` (``scale``,
        ``hard_negative_mask``, …).

    Returns:
      ``(loss, grads, metrics)``; ``grads`` has the structure of ``params``, or is
      ``(param_grads, loss_param_grads)`` when ``loss_params`` is given.
    """
    towers = {"q": q_batch, "p": p_batch}
    b = _leading_dim(q_batch)
    if _leading_dim(p_batch) != b:
        raise ValueError(f"q_batch has {b} rows but p_batch has {_leading_dim(p_batch)}")
    k = None
    if n_batch is not None:
        if "hard_negatives" in loss_kw:
            raise ValueError("pass hard negatives either as n_batch (embedded) or hard_negatives (fixed), not both")
        dims = {x.shape[:2] for x in jax.tree.leaves(n_batch)}
        if len(dims) != 1 or next(iter(dims))[0] != b:
            raise ValueError(f"n_batch leaves must share leading dims [B={b}, K], got {sorted(dims)}")
        k = next(iter(dims))[1]
        towers["n"] = jax.tree.map(lambda x: x.reshape(b * k, *x.shape[2:]), n_batch)
    keys = {t: None if rng is None else jax.random.fold_in(rng, _TOWER_INDEX[t]) for t in towers}

    # pass 1: global embeddings, no activations kept
    embs = {
        t: lax.stop_gradient(embed_in_chunks(embed_fn, params, x, num_chunks=num_chunks, rng=keys[t]))
        for t, x in towers.items()
    }

    # pass 2: loss and dL/d(embeddings) on the global batch
    def global_loss(embs, lp):
        kw = dict(loss_kw)
        if "n" in embs:
            kw["hard_negatives"] = embs["n"].reshape(b, k, -1)
        if lp is not None:
            kw.update(lp)
        return loss_fn(embs["q"], embs["p"], **kw)

    (loss, metrics), (g_embs, g_loss_params) = jax.value_and_grad(global_loss, argnums=(0, 1), has_aux=True)(
        embs, loss_params
    )

    # pass 3: per-chunk forward again under vjp, pulling back the cached cotangents
    acc = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.promote_types(x.dtype, jnp.float32)), params)
    for t, x in towers.items():
        acc = _pullback_in_chunks(embed_fn, params, x, g_embs[t], acc, num_chunks=num_chunks, rng=keys[t])
    grads = jax.tree.map(lambda a, x: a.astype(x.dtype), acc, params)
    if loss_params is not None:
        grads = (grads, g_loss_params)
    return loss, grads, metrics
