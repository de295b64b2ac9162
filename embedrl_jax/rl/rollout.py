"""EG-RL rollouts and their reward: prompts for both sides of each pair, and the reward of every
completion computed by the frozen Embedder (and, optionally, a judge) over the whole batch.

Layout: B pairs become 2B prompts ``[q_1, p_1, q_2, p_2, ...]``; with n samples each the
rollouts are laid out prompt after prompt (row ``k * n + j`` is sample j of prompt k), so a
group -- the n samples of one prompt -- is n consecutive rows, as `group_advantages` expects.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np

from ..prompts import format_candidates, reasoner_prompt, render
from ..tcot import evidence_item
from .rewards import (RewardConfig, format_reward, hardest_negatives, judge_pick, outcome_terms, process_reward,
                      shuffle_candidates, total_reward)

__all__ = ["rollout_prompts", "EGReward", "RewardBatch", "item_text"]


def rollout_prompts(records: Sequence[Any], prompts: Mapping | None = None) -> list[dict]:
    """Reasoner prompt items ``[q_1, p_1, q_2, p_2, ...]`` for PairRecords (media first, then text)."""
    out = []
    for r in records:
        video_target = bool(r.positive.get("video"))
        out.append(reasoner_prompt(_bare(r.query), "query", prompts, retrieves_video=video_target))
        out.append(reasoner_prompt(_bare(r.positive), "positive", prompts))
    return out


def _bare(item: Mapping) -> dict:
    """The item without a stored T-CoT: rollouts write their own."""
    return {k: v for k, v in item.items() if k != "tcot"}


def item_text(item: Mapping) -> str:
    """Instruction + text of an item (what the judge is shown of it)."""
    return " ".join(str(item[k]).strip() for k in ("instruction", "text") if item.get(k))


@dataclasses.dataclass
class RewardBatch:
    """Per-rollout reward parts, each [2B * n] in rollout order, plus batch diagnostics."""

    total: np.ndarray
    format: np.ndarray
    outcome: np.ndarray
    process: np.ndarray
    acc: np.ndarray
    margin: np.ndarray
    is_query: np.ndarray
    stats: dict

    def metrics(self) -> dict[str, float]:
        q = self.is_query
        return {
            "reward/total": float(self.total.mean()),
            "reward/format": float(self.format.mean()),
            "reward/outcome": float(self.outcome.mean()),
            "reward/process": float(self.process.mean()),
            "reward/acc": float(self.acc.mean()),
            "reward/margin": float(self.margin.mean()),
            "reward/outcome_query": float(self.outcome[q].mean()),
            "reward/outcome_positive": float(self.outcome[~q].mean()),
            **self.stats,
        }


# the public outcome pieces, compiled once per batch shape (`outcome_reward` is `.reward` of these)
_outcome_terms = jax.jit(outcome_terms, static_argnames=("temperature",))


class EGReward:
    """The EG-RL reward of a rollout batch (method §7).

    ``embed(items) -> [N, D]`` is the frozen Embedder (L2-normalised rows); ``judge(prompts) ->
    replies`` generates one reply per text prompt, or is None to switch the process reward off.
    Every rollout is embedded from its original item (pixels included) plus its own T-CoT with
    evidence crops / key frames, in one pass over all 2Bn rollouts.
    """

    def __init__(self, embed: Callable[[list[dict]], np.ndarray], config: RewardConfig = RewardConfig(), *,
                 judge: Callable[[list[str]], list[str]] | None = None, prompts: Mapping | None = None,
                 seed: int = 0, key_frames_one_based: bool | None = None):
        self.embed = embed
        self.config = config
        self.judge = judge if config.use_judge else None
        self.prompts = prompts
        self.seed = int(seed)
        self.one_based = key_frames_one_based

    def __call__(self, records: Sequence[Any], texts: Sequence[Sequence[str]], step: int = 0) -> RewardBatch:
        cfg = self.config
        b = len(records)
        if len(texts) != 2 * b:
            raise ValueError(f"{len(texts)} prompts of completions for {b} pairs; expected {2 * b} (query, positive)")
        n = len(texts[0])
        if n < 1 or any(len(t) != n for t in texts):
            raise ValueError("every prompt needs the same number (>= 1) of completions")
        flat = [t for group in texts for t in group]
        sides = [r.query if s == 0 else r.positive for r in records for s in (0, 1)]
        items = [evidence_item(_bare(sides[k]), flat[k * n + j], key_frames_one_based=self.one_based)
                 for k in range(2 * b) for j in range(n)]
        emb = np.asarray(self.embed(items), np.float32)
        if emb.shape[0] != len(items):
            raise ValueError(f"embedder returned {emb.shape[0]} rows for {len(items)} rollouts")
        rows = np.arange(2 * b * n)
        prompt_of = rows // n
        is_query = prompt_of % 2 == 0
        pair = (prompt_of // 2).astype(np.int32)
        q_rows, p_rows = rows[is_query], rows[~is_query]
        terms = _outcome_terms(emb[q_rows], emb[p_rows], pair[q_rows], pair[p_rows],
                               temperature=float(cfg.neg_temperature))
        q_outcome, p_outcome = terms.reward(cfg.acc_w)
        sim = np.asarray(terms.sim)
        acc, margin, outcome = (np.zeros(len(rows), np.float32) for _ in range(3))
        acc[q_rows], acc[p_rows] = terms.q_acc, terms.p_acc
        margin[q_rows], margin[p_rows] = terms.q_margin, terms.p_margin
        outcome[q_rows], outcome[p_rows] = q_outcome, p_outcome
        fmt = format_reward(flat)
        picked_positive = np.zeros(len(rows), bool)
        stats = {}
        if self.judge is not None:
            picked_positive, stats = self._judge(records, flat, sim, q_rows, p_rows, pair, n, step)
        process = np.asarray(process_reward(picked_positive, margin), np.float32)
        total = np.asarray(total_reward(fmt, outcome, process, format_w=cfg.format_w, outcome_w=cfg.outcome_w,
                                        process_w=cfg.process_w), np.float32)
        return RewardBatch(total, fmt, outcome, process, acc, margin, is_query, stats)

    # -------------------------------------------------------------- judge
    def _judge(self, records, flat, sim, q_rows, p_rows, pair, n, step):
        """Which rollouts the judge matched to a true positive ([2Bn] bool), and its parse stats."""
        cfg = self.config
        prompts, owners, positives = [], [], []
        for side_rows, other_rows, s in ((q_rows, p_rows, sim), (p_rows, q_rows, sim.T)):
            hard = np.asarray(hardest_negatives(s, pair[side_rows], pair[other_rows], cfg.judge_top_k))
            for a, row in enumerate(side_rows):
                mine = pair[row]
                cand_cols = list(np.flatnonzero(pair[other_rows] == mine))
                for neg in hard[a]:
                    if neg < 0:
                        continue
                    cols = np.flatnonzero(pair[other_rows] == neg)
                    cand_cols.append(int(cols[np.argmax(s[a, cols])]))
                cand_rows = [int(other_rows[c]) for c in cand_cols]
                call = len(prompts)
                shuffled, _ = shuffle_candidates(cand_rows, self.seed, step * 1_000_003 + call)
                prompts.append(render(
                    "judge", self.prompts, query=self._side_text(records, row, n), reasoning=flat[row].strip(),
                    candidates=format_candidates([self._side_text(records, c, n) + "\n" + flat[c].strip()
                                                  for c in shuffled])))
                owners.append(row)
                positives.append([pair[c] == mine for c in shuffled])
        replies = list(self.judge(prompts))
        if len(replies) != len(prompts):
            raise ValueError(f"judge returned {len(replies)} replies for {len(prompts)} prompts")
        picked_positive = np.zeros(len(flat), bool)
        failed = right = 0
        for row, reply, pos in zip(owners, replies, positives):
            pick = judge_pick(reply, len(pos))
            if pick < 0:
                failed += 1
            elif pos[pick]:
                right += 1
                picked_positive[row] = True
        count = max(len(owners), 1)
        return picked_positive, {"judge/parse_fail": failed / count, "judge/picked_positive": right / count}

    @staticmethod
    def _side_text(records, row, n):
        k = row // n
        r = records[k // 2]
        return item_text(r.query if k % 2 == 0 else r.positive)
