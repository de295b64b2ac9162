"""`embedrl eval mmeb` and `embedrl eval summarize`: MMEB-V2 scores in the official files.

Per task ``<out>/<Task>_score.json`` (the 26 keys of :data:`~.metrics.SCORE_KEYS` in order,
``indent=4``; ``num_skipped`` is appended only when queries were skipped) and
``<Task>_pred.jsonl`` (``prediction``: the top-10 ranked candidate names, ``label``,
``rel_scores``); embeddings are kept in ``<out>/cache/<model>/<Task>/{qry,tgt}/`` keyed by item
content (text, media paths, T-CoT), so a rerun, or the same run with other T-CoTs, embeds only
items it has not seen. ``aggregate.json`` has the official ``{"metadata", "metrics": {"image",
"video", "visdoc"}}`` shape (missing tasks ``"FILE_N/A"``); ``summary.json`` / ``summary.md``
give meta-task means, modality means and the overall mean over tasks (the paper's "All"), in
percent, over the tasks present.
"""
from __future__ import annotations

import datetime
import json
import os
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from ..infer import (KeyedStore, attach_tcots, encode_cached, exact_topk, generate_tcots, load_tcots,
                     write_json_atomic, write_jsonl_atomic)
from .metrics import KS, SCORE_KEYS, main_metric, query_metrics, rank, task_scores
from .readers import TaskData, read_task
from .tasks import META_TASKS, MODALITIES, TASKS, TaskSpec, aggregate_key, tasks_for
from ..errors import UserError

__all__ = ["evaluate_task", "evaluate", "summarize", "score_task", "MISSING"]

MISSING = "FILE_N/A"
TOP = max(KS)


def score_task(data: TaskData, qvecs: np.ndarray, cvecs: np.ndarray, *, official_pairing: bool = False,
               mesh=None) -> tuple[dict, list[dict]]:
    """(score object, prediction rows) of a task from its query and candidate embeddings."""
    preds, per_query = [], []
    if data.local is not None:
        tops = []
        for q, idx in zip(qvecs, data.local):
            idx = np.asarray(idx)
            order = rank(cvecs[idx] @ q)[:TOP]
            tops.append(idx[order])
    else:
        _, tops = exact_topk(qvecs, cvecs, TOP, mesh=mesh)
    for i, top in enumerate(tops):
        names = [data.cand_names[j] for j in top]
        rel = data.rel_scores[i] if data.rel_scores is not None else None
        per_query.append(query_metrics(names, data.labels[i], rel, official_pairing=official_pairing))
        preds.append({"prediction": names, "label": data.labels[i], "rel_scores": rel})
    scores = task_scores(per_query)
    if data.skipped:
        scores["num_skipped"] = data.skipped
    return scores, preds


def _tcot_file(tcot_dir: Path, task: str, side: str) -> Path | None:
    for p in (tcot_dir / task / f"{side}.jsonl", tcot_dir / f"{task}_{side}.jsonl"):
        if p.exists():
            return p
    return None


def evaluate_task(spec: TaskSpec, data_root, out_dir, encode: Callable[[list[dict]], np.ndarray], model_tag: str, *,
                  tcot_dir=None, reasoner=None, reasoner_kw: Mapping | None = None, skip_missing: bool = False,
                  official_pairing: bool = False, mesh=None, log: Callable[[str], None] = print) -> dict:
    """Read, embed (cached), score and write one task; returns its timing/count record."""
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    data = read_task(spec, data_root, skip_missing=skip_missing)
    queries, cands = data.queries, data.cands
    sides = {"query": queries, "candidate": cands}
    if reasoner is not None:
        tcot_dir = out_dir / "tcot"
        for side, items in sides.items():
            generate_tcots(reasoner, items, tcot_dir / spec.name / f"{side}.jsonl", side=side,
                           retrieves_video=side == "query" and spec.parser in ("ret",) and spec.modality == "video",
                           progress=False, **dict(reasoner_kw or {}))
    hits = {}
    if tcot_dir is not None:
        for side in sides:
            f = _tcot_file(Path(tcot_dir), spec.name, side)
            if f is not None:
                sides[side], hits[side] = attach_tcots(sides[side], load_tcots(f), side, source=f"{f} (task {spec.name})")
    cache = out_dir / "cache" / model_tag / spec.name
    qvecs, nq = encode_cached(encode, sides["query"], KeyedStore(cache / "qry"))
    cvecs, nc = encode_cached(encode, sides["candidate"], KeyedStore(cache / "tgt"))
    t_embed = time.perf_counter() - t0
    scores, preds = score_task(data, qvecs, cvecs, official_pairing=official_pairing, mesh=mesh)
    write_json_atomic(out_dir / f"{spec.name}_score.json", scores, indent=4)
    write_jsonl_atomic(out_dir / f"{spec.name}_pred.jsonl", preds)
    rec = {"task": spec.name, "queries": len(queries), "candidates": len(cands), "skipped": data.skipped,
           "embedded": nq + nc, "tcot_hits": hits, "seconds": round(time.perf_counter() - t0, 3),
           "embed_seconds": round(t_embed, 3), main_metric(spec.modality): scores[main_metric(spec.modality)]}
    log(f"{spec.name}: {main_metric(spec.modality)}={scores[main_metric(spec.modality)]:.4f} "
        f"({len(queries)} queries, {len(cands)} candidates, {nq + nc} embedded, {data.skipped} skipped, "
        f"{rec['seconds']:.1f}s)")
    return rec


def evaluate(encode, data_root, out_dir, *, tasks: str | Sequence[str] | None = None, model_tag: str = "model",
             metadata: Mapping | None = None, present_only: bool = True, **kw) -> dict:
    """Evaluate the selected tasks (a task whose folder is absent is skipped when `present_only`
    and the selection is a group), then rebuild the aggregate and the summary."""
    if isinstance(tasks, (list, tuple)):
        tasks = ",".join(tasks)
    specs = tasks_for(tasks)
    explicit = bool(tasks) and all(p.strip() in TASKS for p in str(tasks).split(","))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for spec in specs:
        if present_only and not explicit and not _task_present(spec, data_root):
            continue
        records.append(evaluate_task(spec, data_root, out_dir, encode, model_tag, **kw))
    log_path = out_dir / "eval_log.jsonl"
    with open(log_path, "a", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    if metadata is not None:
        write_json_atomic(out_dir / "metadata.json", {k: str(v) for k, v in metadata.items()})
    return {"records": records, **summarize(out_dir)}


def _task_present(spec: TaskSpec, root) -> bool:
    folder = {"image": ("MMEB_Test_Instruct", spec.name), "video": ("video-annotations", spec.name),
              "visdoc": ("visdoc-tasks", spec.name)}[spec.modality]
    return os.path.isdir(os.path.join(root, *folder))


DEFAULT_METADATA = ("model_name", "model_backbone", "model_size", "embedding_dimension", "max_length_tokens",
                    "data_source", "url", "report_generated_date")


def summarize(out_dir, *, metadata: Mapping | None = None) -> dict:
    """Rebuild ``aggregate.json``, ``summary.json`` and ``summary.md`` from the ``<Task>_score.json``
    files in `out_dir` (any subset of the 78 tasks)."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise FileNotFoundError(f"{out_dir}: no such directory")
    meta_file = out_dir / "metadata.json"
    meta = {k: "N/A" for k in DEFAULT_METADATA}
    meta["data_source"] = "Self-Reported"
    if meta_file.exists():
        meta.update(json.loads(meta_file.read_text()))
    meta.update({k: str(v) for k, v in (metadata or {}).items()})
    meta["report_generated_date"] = datetime.datetime.now(datetime.timezone.utc).isoformat()
    metrics: dict[str, dict] = {m: {} for m in MODALITIES}
    main: dict[str, float] = {}
    for spec in TASKS.values():
        f = out_dir / f"{spec.name}_score.json"
        if not f.exists():
            f = out_dir / f"{aggregate_key(spec.name)}_score.json"
        if f.exists():
            obj = json.loads(f.read_text())
            missing = [k for k in SCORE_KEYS if k not in obj]
            if missing:
                raise UserError(f"{f}: not a score file (missing {missing[:3]}...)")
            metrics[spec.modality][aggregate_key(spec.name)] = obj
            main[spec.name] = float(obj[main_metric(spec.modality)])
        else:
            metrics[spec.modality][aggregate_key(spec.name)] = MISSING
    write_json_atomic(out_dir / "aggregate.json", {"metadata": meta, "metrics": metrics}, indent=4)

    def mean(names):
        vals = [main[n] * 100 for n in names if n in main]
        return (float(np.mean(vals)) if vals else None), len(vals), len(names)

    summary = {"unit": "percent; hit@1 (image, video), ndcg_linear@5 (visdoc)", "meta_tasks": {}, "modalities": {},
               "tasks": {n: v * 100 for n, v in main.items()}}
    for meta_name, names in META_TASKS.items():
        m, have, total = mean(names)
        summary["meta_tasks"][meta_name] = {"score": m, "tasks": have, "of": total}
    for mod in MODALITIES:
        m, have, total = mean([t.name for t in TASKS.values() if t.modality == mod])
        summary["modalities"][mod] = {"score": m, "tasks": have, "of": total}
    m, have, total = mean(list(TASKS))
    summary["overall"] = {"score": m, "tasks": have, "of": total,
                          "rule": "mean over tasks (not over modalities), as the paper's All"}
    write_json_atomic(out_dir / "summary.json", summary, indent=2)
    (out_dir / "summary.md").write_text(_markdown(summary))
    return {"aggregate": str(out_dir / "aggregate.json"), "summary": summary}


def _fmt(entry) -> str:
    return "–" if entry["score"] is None else f"{entry['score']:.1f} ({entry['tasks']}/{entry['of']})"


def _markdown(summary: dict) -> str:
    lines = ["| group | score (tasks present) |", "|---|---|"]
    for name, e in summary["meta_tasks"].items():
        if e["tasks"]:
            lines.append(f"| {name} | {_fmt(e)} |")
    for name, e in summary["modalities"].items():
        lines.append(f"| **{name}** | {_fmt(e)} |")
    lines.append(f"| **All** | {_fmt(summary['overall'])} |")
    lines += ["", "| task | score |", "|---|---|"] + [f"| {n} | {v:.1f} |" for n, v in summary["tasks"].items()]
    return "\n".join(lines) + "\n"
