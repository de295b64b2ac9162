"""Retrieval metrics of the MMEB-V2 harness (reference mmeb_eval.md §3), on ranked names.

A query is scored from its ranked prediction (candidate names, best first; only the top
``max(KS)`` matter), its labels and, for graded tasks, the grade of each label. Definitions:

- L = the distinct labels; k in (1, 5, 10); top = the first k predictions;
- hit@k = 1 if a label is in top; precision@k = |set(top) & L| / k (divisor always k);
  recall@k = |set(top) & L| / |L|; f1@k = 2PR / (P + R) or 0;
- map@k = sum of precision at each rank <= k holding a label, / min(|L|, k);
- mrr@k = 1 / rank of the first label within k, else 0;
- ndcg_{linear,exponential}@k = sum_{i<k} g(rel_i) / log2(i + 2) / IDCG, g = rel or 2**rel - 1.
  Binary tasks: rel = 1 for a label, IDCG from min(|L|, k) ones. Graded tasks: rel = the
  document's grade (0 when unlisted), IDCG from the k largest grades. IDCG = 0 gives 0.

Graded pairing: by default every label keeps its own grade (``dict(zip(labels, grades))``,
the maximum for a repeated label). ``official_pairing=True`` reproduces the official code,
which zips ``list(set(labels))`` with the grades still in qrels order, so a grade can land
on another document (and, for string ids, depend on the hash seed).

Ranking of scores (:func:`rank`) is a stable descending sort: equal scores keep pool order.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

__all__ = ["KS", "METRICS", "SCORE_KEYS", "query_metrics", "task_scores", "rank", "main_metric"]

KS = (1, 5, 10)
METRICS = ("hit", "ndcg_linear", "ndcg_exponential", "precision", "recall", "f1", "map", "mrr")
#: the 26 keys of an official <Task>_score.json, in order
SCORE_KEYS = tuple(f"{m}@{k}" for m in METRICS for k in KS) + ("num_pred", "num_data")


def rank(scores: np.ndarray) -> np.ndarray:
    """Indices of `scores` best first; ties keep their order in the pool (stable sort)."""
    return np.argsort(-np.asarray(scores, np.float64), kind="stable")


def _grades(labels: Sequence, rel_scores: Sequence[float] | None, official_pairing: bool) -> dict | None:
    if rel_scores is None:
        return None
    if len(rel_scores) != len(labels):
        raise ValueError(f"{len(labels)} labels but {len(rel_scores)} rel_scores")
    if official_pairing:
        return dict(zip(list(set(labels)), rel_scores))
    grades: dict = {}
    for lab, g in zip(labels, rel_scores):
        grades[lab] = max(float(g), grades.get(lab, -math.inf))
    return grades


def _dcg(gains: Sequence[float]) -> float:
    return float(sum(g / math.log2(i + 2) for i, g in enumerate(gains)))


def query_metrics(prediction: Sequence, labels: Sequence, rel_scores: Sequence[float] | None = None, *,
                  official_pairing: bool = False) -> dict[str, float]:
    """The 24 metric values of one query (keys ``metric@k``)."""
    label_set = set(labels)
    if not label_set:
        raise ValueError("a query needs at least one label")
    grades = _grades(labels, rel_scores, official_pairing)
    out: dict[str, float] = {}
    for k in KS:
        top = list(prediction[:k])
        found = len(set(top) & label_set)
        p, r = found / k, found / len(label_set)
        hits, ap, first = 0, 0.0, 0.0
        for i, name in enumerate(top):
            if name in label_set:
                hits += 1
                ap += hits / (i + 1)
                if not first:
                    first = 1.0 / (i + 1)
        if grades is None:
            rel = [1.0 if name in label_set else 0.0 for name in top]
            ideal = [1.0] * min(len(label_set), k)
        else:
            rel = [float(grades.get(name, 0.0)) for name in top]
            ideal = sorted(grades.values(), reverse=True)[:k]
        for kind, g in (("linear", lambda x: x), ("exponential", lambda x: 2.0 ** x - 1.0)):
            idcg = _dcg([g(x) for x in ideal])
            out[f"ndcg_{kind}@{k}"] = _dcg([g(x) for x in rel]) / idcg if idcg > 0 else 0.0
        out[f"hit@{k}"] = float(found > 0)
        out[f"precision@{k}"] = p
        out[f"recall@{k}"] = r
        out[f"f1@{k}"] = 2 * p * r / (p + r) if p + r > 0 else 0.0
        out[f"map@{k}"] = ap / min(len(label_set), k)
        out[f"mrr@{k}"] = first
    return out


def task_scores(per_query: Sequence[Mapping[str, float]]) -> dict:
    """The <Task>_score.json object: unweighted means over queries, 26 keys in the official order."""
    n = len(per_query)
    out: dict = {}
    for key in SCORE_KEYS[:-2]:
        out[key] = float(np.mean([q[key] for q in per_query])) if n else 0.0
    out["num_pred"] = n
    out["num_data"] = n
    return out


def main_metric(modality: str) -> str:
    """hit@1 for image and video, ndcg_linear@5 for visual documents (report_score_v2.py)."""
    return "ndcg_linear@5" if modality == "visdoc" else "hit@1"
