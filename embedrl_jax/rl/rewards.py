"""EG-RL (embedding-guided) rewards for the Reasoner.

Array pieces (outcome reward, hard negatives, process reward, total) are pure jnp functions on
global arrays with static shapes, so they run inside jit after one Embedder forward over all
rollouts.  Text pieces (format check, judge parsing, candidate shuffling) are plain Python that
never raise on odd input, because a crash mid-rollout costs a whole RL step.

Tie rule for the top-k accuracy (pessimistic)
---------------------------------------------
``acc(a)`` counts the true positives among the ``k = |P(a)|`` most similar candidates.  When
similarities tie, negatives are ranked *before* positives.  Hence equal scores never earn
credit: a collapsed Embedder (all similarities equal) gets ``acc = 0`` whenever there are at
least ``k`` negatives.  Among positives, or among negatives, ties do not matter for the count.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, NamedTuple, Sequence

import jax.numpy as jnp
import numpy as np
from jax import lax

from ..tcot import is_well_formed

__all__ = [
    "RewardConfig",
    "format_reward",
    "row_outcome_terms",
    "OutcomeTerms",
    "outcome_terms",
    "outcome_reward",
    "hardest_negatives",
    "process_reward",
    "judge_pick",
    "shuffle_candidates",
    "total_reward",
]


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    """Reward constants (method reference §7); the official code lost them, so they live here,
    and only here: the functions below take their defaults from this class."""

    format_w: float = 0.05
    outcome_w: float = 0.8
    process_w: float = 0.2
    acc_w: float = 0.5
    neg_temperature: float = 0.5
    judge_top_k: int = 4
    use_judge: bool = True


# --------------------------------------------------------------------------------------------
# Format reward
# --------------------------------------------------------------------------------------------

def _has_tcot_format(text: Any) -> bool:
    """True if the six tags occur in order; non-strings score False (never raise)."""
    return isinstance(text, str) and is_well_formed(text)


def format_reward(texts: Sequence[str] | str) -> np.ndarray:
    """1.0 per completion that has ``<thinking>…</thinking>``, then ``<rethink>…</rethink>``,
    then ``<answer>…</answer>``, else 0.0; float32 ``[N]``.  A bare string counts as one text;
    non-string items score 0 instead of raising."""
    if isinstance(texts, str):
        texts = [texts]
    return np.asarray([1.0 if _has_tcot_format(t) else 0.0 for t in texts], dtype=np.float32).reshape(-1)


# --------------------------------------------------------------------------------------------
# Outcome reward
# --------------------------------------------------------------------------------------------


def row_outcome_terms(sim, row_pair, col_pair, temperature=RewardConfig.neg_temperature):
    """Per-row top-k precision and softmax-weighted margin against a similarity matrix.

    ``sim [R, C]``; row ``a`` has positives ``P(a) = {c : col_pair[c] == row_pair[a]}`` and
    negatives ``N(a)`` = every other column.  Returns ``(acc [R], margin [R])`` with
      * ``acc = |TopK_{|P|}(sim[a]) ∩ P| / |P|``, ties ranked negatives-first (module doc);
      * ``margin = mean_{P} sim - sum_{N} softmax(sim[a, N] / temperature) * sim``; the
        negative term is 0 when ``N(a)`` is empty (a batch of one pair).
    A row with no positive column at all gets ``acc = 0`` (so its outcome reward is 0) and a
    margin with a zero positive term.  Masks over the whole matrix: no per-row Python loop.
    """
    sim = jnp.asarray(sim, jnp.float32)
    pos = jnp.asarray(row_pair)[:, None] == jnp.asarray(col_pair)[None, :]
    neg = ~pos
    posf = pos.astype(jnp.float32)
    n_pos = jnp.sum(pos, axis=1)  # int, = k per row
    n_cols = sim.shape[1]

    # k-th largest similarity of each row (k = |P(a)|); rows without positives use k = 1.
    desc = -jnp.sort(-sim, axis=1)
    kth = jnp.take_along_axis(desc, jnp.clip(n_pos - 1, 0, n_cols - 1)[:, None], axis=1)
    above = sim > kth
    at = sim == kth
    n_above = jnp.sum(above, axis=1)
    neg_above = jnp.sum(above & neg, axis=1)
    neg_at = jnp.sum(at & neg, axis=1)
    # Everything strictly above the k-th value is in the top-k; the remaining k - n_above slots
    # go to tied entries, negatives first.
    neg_in_top = neg_above + jnp.minimum(neg_at, n_pos - n_above)
    hits = jnp.where(n_pos > 0, n_pos - neg_in_top, 0)
    acc = hits.astype(jnp.float32) / jnp.maximum(n_pos, 1).astype(jnp.float32)

    pos_mean = jnp.sum(sim * posf, axis=1) / jnp.maximum(n_pos, 1).astype(jnp.float32)
    logits = sim / temperature
    row_max = jnp.max(jnp.where(neg, logits, -jnp.inf), axis=1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    e = jnp.where(neg, jnp.exp(jnp.where(neg, logits - row_max, 0.0)), 0.0)
    z = jnp.sum(e, axis=1)
    neg_term = jnp.sum(e * sim, axis=1) / jnp.where(z > 0, z, 1.0)
    return acc, pos_mean - neg_term


def _check_outcome_inputs(q_emb, p_emb, q_pair, p_pair):
    if q_emb.ndim != 2:
        raise ValueError(f"q_emb must be [Nq, D], got shape {q_emb.shape}")
    if p_emb.ndim != 2:
        raise ValueError(f"p_emb must be [Np, D], got shape {p_emb.shape}")
    if q_emb.shape[1] != p_emb.shape[1]:
        raise ValueError(f"q_emb dim D={q_emb.shape[1]} != p_emb dim D={p_emb.shape[1]}")
    if q_emb.shape[0] == 0 or p_emb.shape[0] == 0:
        raise ValueError(f"q_emb and p_emb need at least one row, got {q_emb.shape}, {p_emb.shape}")
    for name, ids, n in (("q_pair", q_pair, q_emb.shape[0]), ("p_pair", p_pair, p_emb.shape[0])):
        if ids.shape != (n,):
            raise ValueError(f"{name} must give one pair id per row, shape ({n},), got {ids.shape}")
        if not jnp.issubdtype(ids.dtype, jnp.integer):
            raise ValueError(f"{name} must hold integer pair ids, got dtype {ids.dtype}")


class OutcomeTerms(NamedTuple):
    """Everything the outcome reward is made of, kept for the judge and the diagnostics:
    ``sim [Nq, Np]`` and each side's ``acc`` / ``margin`` (see ``row_outcome_terms``)."""

    sim: Any
    q_acc: Any
    q_margin: Any
    p_acc: Any
    p_margin: Any

    def reward(self, scale=RewardConfig.acc_w):
        """``(q_reward [Nq], p_reward [Np]) = scale * acc * margin`` on each side."""
        return scale * self.q_acc * self.q_margin, scale * self.p_acc * self.p_margin


def outcome_terms(q_emb, p_emb, q_pair, p_pair, temperature=RewardConfig.neg_temperature) -> OutcomeTerms:
    """The similarity matrix and both sides' top-k precision and margin (``outcome_reward``'s
    parts); inputs checked eagerly as there."""
    q_emb = jnp.asarray(q_emb)
    p_emb = jnp.asarray(p_emb)
    q_pair = jnp.asarray(q_pair)
    p_pair = jnp.asarray(p_pair)
    _check_outcome_inputs(q_emb, p_emb, q_pair, p_pair)
    sim = jnp.dot(q_emb.astype(jnp.float32), p_emb.astype(jnp.float32).T, precision=lax.Precision.HIGHEST)
    q_acc, q_margin = row_outcome_terms(sim, q_pair, p_pair, temperature)
    p_acc, p_margin = row_outcome_terms(sim.T, p_pair, q_pair, temperature)
    return OutcomeTerms(sim, q_acc, q_margin, p_acc, p_margin)


def outcome_reward(q_emb, p_emb, q_pair, p_pair, temperature=RewardConfig.neg_temperature, *,
                   scale=RewardConfig.acc_w):
    """Outcome reward for query and positive rollouts: ``scale * acc * margin`` on each side.

    ``q_emb [Nq, D]`` and ``p_emb [Np, D]`` are L2-normalised rollout embeddings; ``q_pair
    [Nq]`` / ``p_pair [Np]`` integer pair ids.  ``S = q_emb @ p_emb.T``; query rows are scored
    on ``S`` against positive rollouts, positive rollouts symmetrically on ``S.T`` against
    query rollouts (see ``row_outcome_terms``).  Returns ``(q_reward [Nq], p_reward [Np])``.

    Shapes are checked eagerly (ValueError naming the argument) and every row is scored; there
    is no constant fallback, which silently zeroed all advantages in the official code.
    """
    return outcome_terms(q_emb, p_emb, q_pair, p_pair, temperature).reward(scale)


# --------------------------------------------------------------------------------------------
# Process reward pieces
# --------------------------------------------------------------------------------------------


def hardest_negatives(sim, row_pair, col_pair, k: int = RewardConfig.judge_top_k):
    """For each row, the ``k`` hardest other pair ids, hardest first, padded with -1.

    A pair's hardness for row ``a`` is its most similar column, ``max_{c: pair(c)=p} sim[a, c]``;
    the row's own pair is excluded and every pair appears at most once.  Equal hardness keeps
    the pair whose first column comes first.  Returns int32 ``[R, k]``; used to pick the judge's
    negative candidates.  The pairwise ``[R, C, C]`` mask is fine at RL batch sizes (C ≈ 128).
    """
    k = int(k)
    sim = jnp.asarray(sim, jnp.float32)
    row_pair = jnp.asarray(row_pair)
    col_pair = jnp.asarray(col_pair)
    n_rows, n_cols = sim.shape
    if row_pair.shape != (n_rows,) or col_pair.shape != (n_cols,):
        raise ValueError(f"row_pair {row_pair.shape} / col_pair {col_pair.shape} do not match sim {sim.shape}")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    if k == 0:
        return jnp.zeros((n_rows, 0), jnp.int32)
    same = col_pair[:, None] == col_pair[None, :]  # [C, C]
    pair_best = jnp.max(jnp.where(same[None], sim[:, None, :], -jnp.inf), axis=2)  # [R, C]
    earlier = jnp.tril(jnp.ones((n_cols, n_cols), bool), k=-1)
    first_of_pair = ~jnp.any(same & earlier, axis=1)  # one representative column per pair
    eligible = first_of_pair[None, :] & (col_pair[None, :] != row_pair[:, None])
    score = jnp.where(eligible, pair_best, -jnp.inf)
    kk = min(k, n_cols)
    top_score, top_idx = lax.top_k(score, kk)
    ids = jnp.where(jnp.isneginf(top_score), -1, col_pair[top_idx].astype(jnp.int32))
    if kk < k:
        ids = jnp.concatenate([ids, jnp.full((n_rows, k - kk), -1, jnp.int32)], axis=1)
    return ids


def process_reward(choice_is_positive, margin):
    """``margin`` where the judge picked a true positive, else 0 (also for failed judge calls)."""
    margin = jnp.asarray(margin, jnp.float32)
    return jnp.where(jnp.asarray(choice_is_positive, bool), margin, 0.0)


_FIRST_INT = re.compile(r"[-+]?\d+")


def judge_pick(text: Any, n_candidates: int) -> int:
    """0-based index of the candidate the judge chose, or -1.

    The judge sees candidates numbered 1..n; the first integer in its reply is that number, so
    the result is ``number - 1``.  No integer, a number outside ``1..n``, a non-string reply or an
    unparsable one (e.g. a 5000-digit run) gives -1; it never raises.
    """
    try:
        if not isinstance(text, str):
            return -1
        m = _FIRST_INT.search(text)
        if m is None:
            return -1
        number = int(m.group(0))
        if 1 <= number <= int(n_candidates):
            return number - 1
        return -1
    except Exception:  # noqa: BLE001 - a bad judge reply must never kill a rollout step
        return -1


def shuffle_candidates(candidates: Sequence[Any], seed: int, call_index: int):
    """Deterministically shuffle judge candidates; returns ``(shuffled, permutation)``.

    ``shuffled[i] == candidates[permutation[i]]``, so the judge's 0-based pick ``j`` maps back
    to original candidate ``permutation[j]``.  Why: unshuffled lists put the positives first and
    reward the judge's position bias (official-code bug #4).  The generator is seeded from
    ``(seed, call_index)`` so a run is reproducible and calls differ from one another.
    """
    items = list(candidates)
    rng = np.random.default_rng([int(seed), int(call_index)])
    perm = rng.permutation(len(items))
    return [items[i] for i in perm], perm


def total_reward(fmt, outcome, process, *, format_w=RewardConfig.format_w, outcome_w=RewardConfig.outcome_w,
                 process_w=RewardConfig.process_w):
    """``format_w * fmt + outcome_w * outcome + process_w * process``: one scalar per response."""
    fmt = jnp.asarray(fmt, jnp.float32)
    outcome = jnp.asarray(outcome, jnp.float32)
    process = jnp.asarray(process, jnp.float32)
    return format_w * fmt + outcome_w * outcome + process_w * process
