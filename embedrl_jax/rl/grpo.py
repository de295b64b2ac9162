"""GRPO building blocks as small, pure, jit-able functions.

The learner is assembled from named pieces (advantage estimator, policy loss, KL estimator,
aggregation mode) looked up in a registry, so a config string picks the variant and every
piece can be unit-tested on plain arrays.  Everything is computed in float32.

Conventions
-----------
* Token arrays are ``[B, T]``; ``mask`` is 1 for response tokens that carry loss, 0 otherwise.
* ``advantages`` are per sequence, ``[B]`` (one scalar reward per response).
* Values at masked-out positions are replaced by 0 before any arithmetic, so padding that holds
  garbage (``-inf`` log-probs, NaN) can neither reach the loss nor its gradient.
"""
from __future__ import annotations

from typing import Callable

import jax.numpy as jnp
from jax import lax

from ..models.logprobs import token_logprobs  # noqa: F401  (re-exported: rl.token_logprobs)

__all__ = [
    "REGISTRY",
    "register",
    "lookup",
    "group_advantages",
    "ppo_clip_objective",
    "k1_kl",
    "k3_kl",
    "aggregate",
    "grpo_loss",
    "token_logprobs",
    "ADV_EPS",
    "LOG_RATIO_CLAMP",
]

ADV_EPS = 1e-6
"""Added to the group std so a zero-variance group gives finite (zero) advantages."""

LOG_RATIO_CLAMP = 20.0
"""Log-ratios are clamped to ±20 before ``exp`` so one stale token cannot overflow the loss."""

# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------

REGISTRY: dict[str, dict[str, Callable]] = {
    "advantage": {},
    "policy_loss": {},
    "kl": {},
    "aggregation": {},
}
"""kind -> {name -> function}.  Kinds are fixed; names are what configs refer to."""


def register(kind: str, name: str):
    """Decorator adding a function to ``REGISTRY[kind][name]``.

    Why: the learner picks estimators from config strings instead of if/else chains, and a
    duplicate name is an error rather than a silent override.
    """
    if kind not in REGISTRY:
        raise ValueError(f"unknown registry kind {kind!r}; expected one of {sorted(REGISTRY)}")

    def deco(fn):
        if name in REGISTRY[kind]:
            raise ValueError(f"{kind} {name!r} is already registered")
        REGISTRY[kind][name] = fn
        return fn

    return deco


def lookup(kind: str, name: str) -> Callable:
    """Return the function registered as ``REGISTRY[kind][name]`` with a helpful error."""
    if kind not in REGISTRY:
        raise ValueError(f"unknown registry kind {kind!r}; expected one of {sorted(REGISTRY)}")
    table = REGISTRY[kind]
    if name not in table:
        raise ValueError(f"unknown {kind} {name!r}; registered: {sorted(table)}")
    return table[name]


def _safe_den(den):
    """Denominator guard: an empty mask gives 0/1 = 0 instead of 0/0 = NaN."""
    return jnp.where(den > 0, den, jnp.ones_like(den))


# --------------------------------------------------------------------------------------------
# Advantages
# --------------------------------------------------------------------------------------------


def group_advantages(rewards, group_size: int, normalize_std: bool = True):
    """Group-relative advantages for rewards laid out group after group.

    ``rewards[N]`` with ``N = G * group_size``; each block of ``group_size`` consecutive entries
    holds the rollouts of one prompt.  Returns ``(r - mean_g) / (std_g + 1e-6)`` using the
    unbiased (ddof=1) std, or ``r - mean_g`` when ``normalize_std`` is False (Dr.GRPO).

    A group whose rewards are all equal gets exactly 0 (not the rounding error of its mean
    divided by 1e-6). Why ddof=1: it is what the reference trainer uses.  With ``group_size == 1`` that std is
    undefined; it is taken as 0, and since ``r - mean_g`` is then 0 the advantage is 0 (a lone
    rollout carries no relative signal), never NaN.
    """
    group_size = int(group_size)
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    rewards = jnp.asarray(rewards, jnp.float32)
    if rewards.ndim != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {rewards.shape}")
    n = rewards.shape[0]
    if n % group_size:
        raise ValueError(f"rewards length {n} is not a multiple of group_size {group_size}")
    r = rewards.reshape(n // group_size, group_size)
    # a group of equal rewards is exactly zero: its float mean can be one ulp off the value,
    # which the (std + 1e-6) division would blow up into a spurious advantage
    flat = jnp.max(r, axis=1, keepdims=True) == jnp.min(r, axis=1, keepdims=True)
    centred = jnp.where(flat, 0.0, r - jnp.mean(r, axis=1, keepdims=True))
    if normalize_std:
        if group_size > 1:
            std = jnp.sqrt(jnp.sum(centred**2, axis=1, keepdims=True) / (group_size - 1))
        else:
            std = jnp.zeros_like(centred)
        centred = centred / (std + ADV_EPS)
    return centred.reshape(n)


@register("advantage", "grpo")
def _grpo_advantage(rewards, group_size):
    """GRPO: group mean removed, divided by the unbiased group std (+1e-6)."""
    return group_advantages(rewards, group_size, normalize_std=True)


@register("advantage", "drgrpo")
def _drgrpo_advantage(rewards, group_size):
    """Dr.GRPO: group mean removed, no std division (avoids up-weighting easy groups)."""
    return group_advantages(rewards, group_size, normalize_std=False)


# --------------------------------------------------------------------------------------------
# Per-token policy loss and KL estimators
# --------------------------------------------------------------------------------------------


@register("policy_loss", "ppo_clip")
def ppo_clip_objective(log_ratio, adv, *, clip_low=0.2, clip_high=0.2, dual_clip=3.0):
    """Per-token PPO clipped surrogate (to minimise), with optional dual clip.

    ``log_ratio = logp - old_logp`` (old already stop-gradiented), ``adv`` broadcastable to it.
    Returns ``(pg, ratio, clip_active, dual_active)``:
      * ``pg = max(-A r, -A clip(r, 1-eps_low, 1+eps_high))``;
      * for ``A < 0`` the dual clip caps it at ``-A c`` so a very large ratio on a bad token
        cannot produce an unbounded loss (``dual_clip=None`` disables it);
      * ``clip_active`` is where the clipped branch strictly wins, ``dual_active`` where the
        dual cap replaced the value.
    """
    ratio = jnp.exp(jnp.clip(log_ratio, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    unclipped = -adv * ratio
    clipped = -adv * jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
    pg = jnp.maximum(unclipped, clipped)
    clip_active = clipped > unclipped
    if dual_clip is None:
        dual_active = jnp.zeros_like(clip_active)
    else:
        cap = -adv * dual_clip
        dual_active = (adv < 0) & (pg > cap)
        pg = jnp.where(adv < 0, jnp.minimum(pg, cap), pg)
    return pg, ratio, clip_active, dual_active


@register("kl", "k1")
def k1_kl(logp, ref_logp):
    """Naive estimator ``logp - ref``: unbiased for KL(pi||ref) but high variance, can be < 0."""
    return logp - ref_logp


@register("kl", "k3")
def k3_kl(logp, ref_logp):
    """Low-variance k3 estimator ``exp(ref - logp) - (ref - logp) - 1`` (always >= 0).

    The log-ratio is clamped to ±20 so ``exp`` (and its gradient) stays finite.
    """
    d = jnp.clip(ref_logp - logp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return jnp.exp(d) - d - 1.0


# --------------------------------------------------------------------------------------------
# Aggregation: each mode returns (numerator, denominator); loss = num / max-guarded den.
# Returning both lets mini-batches be accumulated exactly: sum(num) / sum(den).
# --------------------------------------------------------------------------------------------


@register("aggregation", "token-mean")
def _agg_token_mean(values, mask):
    """Every response token weighs the same (Embed-RL's choice): sum / #tokens."""
    return jnp.sum(values * mask), jnp.sum(mask)


@register("aggregation", "seq-mean-token-mean")
def _agg_seq_mean_token_mean(values, mask):
    """Every sequence weighs the same: mean over non-empty sequences of their token means."""
    count = jnp.sum(mask, axis=1)
    per_seq = jnp.sum(values * mask, axis=1) / _safe_den(count)
    return jnp.sum(per_seq), jnp.sum((count > 0).astype(jnp.float32))


@register("aggregation", "seq-mean-token-sum")
def _agg_seq_mean_token_sum(values, mask):
    """Mean over non-empty sequences of their token sums (longer responses weigh more)."""
    count = jnp.sum(mask, axis=1)
    per_seq = jnp.sum(values * mask, axis=1)
    return jnp.sum(per_seq), jnp.sum((count > 0).astype(jnp.float32))


@register("aggregation", "token-sum-norm")
def _agg_token_sum_norm(values, mask):
    """Dr.GRPO: token sum over a constant ``B * T`` so the length does not rescale the signal."""
    return jnp.sum(values * mask), jnp.asarray(values.shape[0] * values.shape[1], jnp.float32)


def aggregate(values, mask, mode: str = "token-mean"):
    """Reduce ``[B, T]`` per-token values under ``mask``; returns ``(value, num, den)``."""
    num, den = lookup("aggregation", mode)(values, mask)
    return num / _safe_den(den), num, den


# --------------------------------------------------------------------------------------------
# The loss
# --------------------------------------------------------------------------------------------


def grpo_loss(
    logp,
    old_logp,
    ref_logp,
    advantages,
    mask,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = 3.0,
    kl_coef: float = 0.01,
    aggregation: str = "token-mean",
    policy_loss: str = "ppo_clip",
    kl_estimator: str = "k3",
):
    """GRPO/PPO loss on ``[B, T]`` token log-probs with per-sequence ``advantages [B]``.

    Per token: the clipped surrogate (``policy_loss``) plus ``kl_coef * KL`` (``kl_estimator``,
    k3 by default) against the frozen reference; both ``old_logp`` and ``ref_logp`` are
    stop-gradiented.  ``kl_coef`` is a static Python number: when it is 0 the reference is not
    used at all and ``ref_logp`` may be None.  The per-token sum is reduced by ``aggregation``.

    Returns ``(loss, metrics)``; metrics hold ``pg_loss`` and ``kl`` (same aggregation, so
    ``loss == pg_loss + kl_coef * kl``), ``clip_fraction``, ``dual_clip_fraction`` and
    ``ratio_mean`` (means over masked tokens), and ``loss_numerator`` / ``loss_denominator``
    (the un-guarded aggregation parts, for exact accumulation over mini-batches).
    """
    if dual_clip is not None and not dual_clip > 1.0:
        raise ValueError(f"dual_clip must be > 1 (or None), got {dual_clip}")
    if kl_coef != 0 and ref_logp is None:
        raise ValueError("ref_logp is None but kl_coef != 0; pass reference log-probs or set kl_coef=0")

    mask = jnp.asarray(mask).astype(jnp.float32)
    if mask.ndim != 2:
        raise ValueError(f"mask must be [B, T], got shape {mask.shape}")
    valid = mask > 0

    def clean(x, name):
        x = jnp.asarray(x, jnp.float32)
        if x.shape != mask.shape:
            raise ValueError(f"{name} must have the mask's shape {mask.shape}, got {x.shape}")
        return jnp.where(valid, x, 0.0)

    logp = clean(logp, "logp")
    old_logp = lax.stop_gradient(clean(old_logp, "old_logp"))
    adv = jnp.asarray(advantages, jnp.float32)
    if adv.shape != mask.shape[:1]:
        raise ValueError(f"advantages must be [B] = {mask.shape[:1]}, got {adv.shape}")

    pg, ratio, clip_active, dual_active = lookup("policy_loss", policy_loss)(
        logp - old_logp, adv[:, None], clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip
    )
    pg_loss, pg_num, pg_den = aggregate(pg, mask, aggregation)

    if kl_coef != 0:
        ref_logp = lax.stop_gradient(clean(ref_logp, "ref_logp"))
        kl_tok = lookup("kl", kl_estimator)(logp, ref_logp)
        per_token = pg + kl_coef * kl_tok
        kl, _, _ = aggregate(kl_tok, mask, aggregation)
    else:
        per_token = pg
        kl = jnp.zeros((), jnp.float32)

    loss, num, den = aggregate(per_token, mask, aggregation)
    n_tok = _safe_den(jnp.sum(mask))

    def token_mean(x):
        return jnp.sum(x.astype(jnp.float32) * mask) / n_tok

    metrics = {
        "pg_loss": pg_loss,
        "kl": kl,
        "clip_fraction": token_mean(clip_active),
        "dual_clip_fraction": token_mean(dual_active),
        "ratio_mean": token_mean(ratio),
        "loss_numerator": num,
        "loss_denominator": den,
    }
    return loss, metrics
