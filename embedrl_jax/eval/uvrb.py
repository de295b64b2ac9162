"""`embedrl eval uvrb`: UVRB in Embed-RL's layout (mmeb_eval.md §5).

``<root>/<DS>/UVRB/<DS>/jsonl/{queries,corpus,instances}.jsonl``, frames in
``videos_frames/<stem>/`` (sorted lexicographically, 8 by linspace), query images in ``images/``.
Each query ranks the whole corpus by q.c (top 50 kept); R@k is hit@k, as Embed-RL computes it,
and P@1 = R@1. Per dataset ``<DS>_score.json``; ``uvrb_summary.json`` holds both averages of the
GVE paper: over datasets, and over the six abilities TXT, CMP, VIS, CG, FG, LC.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np

from ..infer import KeyedStore, encode_cached, exact_topk, read_jsonl, write_json_atomic
from .readers import VIDEO_CANDIDATE_TEXT, TaskFileError, choose_frames
from ..errors import UserError

__all__ = ["UVRB_DATASETS", "ABILITIES", "MAIN_METRIC", "read_uvrb", "evaluate_uvrb", "uvrb_summary"]

UVRB_GROUPS = {
    "CG": ("MSRVTT", "DiDeMo", "CRB-G"),
    "FG": ("CRB-S", "VDC-O", "CRB-T", "CMRB", "DREAM-E", "LoVR-TH", "PEV-K"),
    "LC": ("LoVR-V", "VDC-D"),
    "CMP": ("MS-TI", "MS-TV"),
    "VIS": ("MSRVTT-I2V", "LoVR-C2V"),
}
ABILITIES = {"TXT": UVRB_GROUPS["CG"] + UVRB_GROUPS["FG"] + UVRB_GROUPS["LC"], "CMP": UVRB_GROUPS["CMP"],
             "VIS": UVRB_GROUPS["VIS"], "CG": UVRB_GROUPS["CG"], "FG": UVRB_GROUPS["FG"], "LC": UVRB_GROUPS["LC"]}
UVRB_DATASETS = ABILITIES["TXT"] + ABILITIES["CMP"] + ABILITIES["VIS"]
MAIN_METRIC = {ds: "R@1" for ds in UVRB_DATASETS} | {"CMRB": "R@10", "LoVR-TH": "R@10", "MS-TI": "P@1",
                                                      "MS-TV": "P@1"}
DEFAULT_PROMPT = "Find the video that matches the given query:"
KS = (1, 5, 10, 50)


def _dataset_dir(root: str, ds: str) -> str:
    for name in (ds, ds.replace("-", "_")):
        d = os.path.join(root, name, "UVRB", name)
        if os.path.isdir(d):
            return d
    raise TaskFileError(f"UVRB dataset {ds}: folder {os.path.join(root, ds, 'UVRB', ds)} does not exist")


def read_uvrb(root: str, ds: str, prompt: str = DEFAULT_PROMPT):
    """(query items, corpus items, corpus ids, positives per query)."""
    base = _dataset_dir(root, ds)
    files = {}
    for what in ("queries", "corpus", "instances"):
        f = os.path.join(base, "jsonl", f"{what}.jsonl")
        if not os.path.exists(f):
            raise TaskFileError(f"UVRB dataset {ds}: missing {f}")
        files[what] = read_jsonl(f)

    def video(stem, where):
        folder = os.path.join(base, "videos_frames", os.path.splitext(os.path.basename(str(stem)))[0])
        if not os.path.isdir(folder):
            raise TaskFileError(f"UVRB dataset {ds}: {where}: frame folder {folder} does not exist")
        return choose_frames(folder, natural=False)

    corpus, cids = [], []
    for i, row in enumerate(files["corpus"]):
        cids.append(str(row["id"]))
        corpus.append({"text": VIDEO_CANDIDATE_TEXT, "video": video(row["video"], f"corpus row {i}")})
    index = {c: j for j, c in enumerate(cids)}
    pos = {str(r["qid"]): [index[str(p)] for p in r["pos"] if str(p) in index] for r in files["instances"]}
    queries, positives = [], []
    for i, row in enumerate(files["queries"]):
        qid = str(row["id"])
        if not pos.get(qid):
            continue
        item = {"text": f"{prompt} {row.get('text') or ''}".strip()}
        if row.get("video"):
            item["video"] = video(row["video"], f"query row {i}")
        if row.get("image"):
            path = os.path.join(base, "images", str(row["image"]))
            if not os.path.exists(path):
                raise TaskFileError(f"UVRB dataset {ds}: query row {i}: image {path} does not exist")
            item["images"] = [path]
        queries.append(item)
        positives.append(pos[qid])
    return queries, corpus, cids, positives


def evaluate_uvrb(encode: Callable, root, out_dir, datasets=None, *, model_tag: str = "model", mesh=None,
                  prompts: dict | None = None, log=print) -> dict:
    out_dir = Path(out_dir)
    present = [ds for ds in UVRB_DATASETS if any(os.path.isdir(os.path.join(root, n)) for n in (ds, ds.replace("-", "_")))]
    datasets = list(datasets) if datasets else present
    if not datasets:
        raise FileNotFoundError(f"no UVRB dataset folder under {root} (expected e.g. {root}/MSRVTT/UVRB/MSRVTT)")
    for ds in datasets:
        if ds not in UVRB_DATASETS:
            raise UserError(f"unknown UVRB dataset {ds!r} (known: {UVRB_DATASETS})")
        queries, corpus, _, positives = read_uvrb(os.fspath(root), ds, (prompts or {}).get(ds, DEFAULT_PROMPT))
        cache = out_dir / "cache" / model_tag / f"uvrb-{ds}"
        q, _ = encode_cached(encode, queries, KeyedStore(cache / "qry"))
        c, _ = encode_cached(encode, corpus, KeyedStore(cache / "tgt"))
        _, top = exact_topk(q, c, max(KS), mesh=mesh)
        scores = {f"R@{k}": float(np.mean([bool(set(t[:k]) & set(p)) for t, p in zip(top, positives)])) for k in KS}
        scores["P@1"] = scores["R@1"]
        scores["main_metric"] = MAIN_METRIC[ds]
        scores["main"] = scores[MAIN_METRIC[ds]]
        scores["num_queries"], scores["num_corpus"] = len(queries), len(corpus)
        write_json_atomic(out_dir / f"{ds}_score.json", scores)
        log(f"UVRB {ds}: {MAIN_METRIC[ds]}={scores['main']:.4f} ({len(queries)} queries, {len(corpus)} videos)")
    return uvrb_summary(out_dir)


def uvrb_summary(out_dir) -> dict:
    """AVG of datasets and AVG of abilities (percent) over the datasets with a score file."""
    import json

    out_dir = Path(out_dir)
    main = {}
    for ds in UVRB_DATASETS:
        f = out_dir / f"{ds}_score.json"
        if f.exists():
            main[ds] = json.loads(f.read_text())["main"] * 100
    abilities = {a: (float(np.mean([main[d] for d in names if d in main])) if any(d in main for d in names) else None)
                 for a, names in ABILITIES.items()}
    have = [v for v in abilities.values() if v is not None]
    summary = {"datasets": main, "avg_datasets": float(np.mean(list(main.values()))) if main else None,
               "abilities": abilities, "avg_abilities": float(np.mean(have)) if have else None,
               "datasets_present": len(main), "of": len(UVRB_DATASETS)}
    write_json_atomic(out_dir / "uvrb_summary.json", summary, indent=2)
    return summary
