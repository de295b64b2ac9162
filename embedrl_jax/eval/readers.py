"""Readers for local copies of MMEB-V2 (image / video / visdoc) in the official row formats.

Layout under ``--data-root`` (each annotation folder holds ``test.jsonl`` or ``*.parquet``):

- image:  ``MMEB_Test_Instruct/<Task>/`` rows ``qry_inst, qry_text, qry_img_path, tgt_inst,
  tgt_text[], tgt_img_path[]``; images under ``image-tasks/`` (a bare file name is read as
  ``<Task>/<name>``, as Embed-RL's evaluation patches it);
- video:  ``video-annotations/<Task>/`` rows in the per-dataset fields of the reference; frames
  under ``video-tasks/frames/<group>/<Task>/<id>/`` (8 chosen by ``linspace(0, n-1, 8)`` on the
  naturally sorted files; fewer than 8 are all used);
- visdoc: ``visdoc-tasks/<Task>/{queries,corpus,qrels}/`` (BEIR) and page images
  ``visdoc-tasks/<Task>/images/<corpus-id>.png`` (VisRAG: the md5-suffixed name of the reference);
  a relative ``image`` path in a corpus row is taken as given.

A task becomes a :class:`TaskData`: query items, unique candidate items with their names, each
query's local candidate list (indices into the candidates, positive first, repeats kept) or
None for the global pool, labels and (visdoc) grades. Items carry a ``key`` (the T-CoT cache key:
image path + text for queries; video id, image path or text for candidates, as the official T-CoT
files key them).
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import re
from typing import Any, Iterable

import numpy as np

from .tasks import TaskSpec
from ..errors import UserError

__all__ = ["TaskData", "read_task", "read_rows", "choose_frames", "natural_key", "TaskFileError",
           "VIDEO_CANDIDATE_TEXT", "VISDOC_QUERY", "VISDOC_PAGE_TEXT"]

VISDOC_QUERY = "Find a document image that matches the given query: {query}"
VISDOC_PAGE_TEXT = "Understand the content of the provided document image."
VIDEO_CANDIDATE_TEXT = "Understand the content of the provided video."
VIDEO_RET_INSTRUCTION = "Find a video that contains the following visual content:"
VIDEO_QA_INSTRUCTION = ("Given a video and a question, select the most accurate answer from the provided "
                        "candidates. Return only the exact text of your chosen answer. Question: ")
VIDEO_CLS_INSTRUCTION = {"K700": "Recognize the category of the video content."}
VIDEO_CLS_DEFAULT = "Recognize the category of the video content."
VIDEO_MRET_INSTRUCTION = "Find the clip that corresponds to the given text:"
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif")


class TaskFileError(FileNotFoundError):
    """A task folder lacks a file; the message names the task and the file."""


@dataclasses.dataclass
class TaskData:
    spec: TaskSpec
    queries: list[dict]
    cands: list[dict]
    cand_names: list[str]
    local: list[list[int]] | None
    labels: list[list[str]]
    rel_scores: list[list[float]] | None = None
    skipped: int = 0
    skipped_rows: list[int] = dataclasses.field(default_factory=list)

    @property
    def name(self) -> str:
        return self.spec.name


def natural_key(name: str):
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def choose_frames(folder: str, n: int = 8, *, natural: bool = True) -> list[str]:
    """`n` frame paths of a frame folder: sorted (naturally, or lexicographically for UVRB), then
    ``linspace(0, count-1, n)`` cast to int; all of them when there are fewer than `n`."""
    files = [f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTS)]
    files.sort(key=natural_key if natural else None)
    if len(files) > n:
        files = [files[i] for i in np.linspace(0, len(files) - 1, n).astype(int)]
    return [os.path.join(folder, f) for f in files]


def read_rows(folder: str, task: str, what: str = "annotations") -> list[dict]:
    """Rows of ``folder/*.jsonl`` or ``folder/*.parquet`` (sorted file names); a missing folder or
    an empty one names the task and the path."""
    if not os.path.isdir(folder):
        raise TaskFileError(f"task {task}: {what} folder {folder} does not exist")
    files = sorted(glob.glob(os.path.join(folder, "*.jsonl"))) or sorted(glob.glob(os.path.join(folder, "*.parquet")))
    if not files:
        raise TaskFileError(f"task {task}: no {what} file (*.jsonl or *.parquet) in {folder}")
    rows: list[dict] = []
    for f in files:
        if f.endswith(".jsonl"):
            with open(f, encoding="utf-8") as fh:
                for n, line in enumerate(fh):
                    if line.strip():
                        try:
                            rows.append(json.loads(line))
                        except json.JSONDecodeError as e:
                            raise UserError(f"task {task}: {f} line {n + 1}: {e}") from None
        else:
            import pyarrow.parquet as pq

            rows += pq.read_table(f).to_pylist()
    return rows


def _need(row: dict, field: str, task: str, i: int):
    if field not in row:
        raise UserError(f"task {task}: row {i} has no field {field!r} (fields: {sorted(row)})")
    return row[field]


class _Builder:
    """Accumulates unique candidates and queries while a reader walks the rows."""

    def __init__(self, spec: TaskSpec, skip_missing: bool):
        self.spec, self.skip_missing = spec, skip_missing
        self.queries: list[dict] = []
        self.cands: list[dict] = []
        self.names: list[str] = []
        self.index: dict[str, int] = {}
        self.local: list[list[int]] = []
        self.labels: list[list[str]] = []
        self.grades: list[list[float]] = []
        self.skipped: list[int] = []

    def cand(self, name: str, item: dict) -> int:
        key = json.dumps([name, item], sort_keys=True, default=str)
        if key not in self.index:
            self.index[key] = len(self.cands)
            self.cands.append(item)
            self.names.append(name)
        return self.index[key]

    def check_media(self, paths: Iterable[str], row: int, what: str) -> bool:
        """True when every file exists; else a counted skip or an error naming task and row."""
        for p in paths:
            if not os.path.exists(p):
                if self.skip_missing:
                    self.skipped.append(row)
                    return False
                raise FileNotFoundError(f"task {self.spec.name}: row {row}: {what} {p} does not exist "
                                        "(pass --skip-missing to count and skip such queries)")
        return True

    def done(self, *, local: bool, graded: bool = False) -> TaskData:
        return TaskData(self.spec, self.queries, self.cands, self.names, self.local if local else None,
                        self.labels, self.grades if graded else None, len(self.skipped), self.skipped)


# ------------------------------------------------------------------------------------------ image
def _strip_marker(text: str) -> str:
    return re.sub(r"<\|image_\d+\|>", "", text or "")


def _image_path(root: str, task: str, rel: str) -> str:
    rel = rel.strip()
    if "/" not in rel and "\\" not in rel:
        rel = f"{task}/{rel}"
    return os.path.join(root, "image-tasks", rel)


def _query_text(parser: str, inst: str, text: str, task: str) -> str:
    inst = _strip_marker(inst)
    if parser == "t2i":
        out = f"{inst.strip()} {text}".strip() + "\n"
        return out + "\n" if task == "VisDial" else out
    if parser in ("qa", "i2i_vg"):
        inst = "\n" + inst.strip()
    out = f"{inst} {text}".replace(" \n", "\n").strip(" ")
    return out.rstrip("\n") + "\n"


def read_image_task(spec: TaskSpec, root: str, *, skip_missing: bool = False) -> TaskData:
    rows = read_rows(os.path.join(root, "MMEB_Test_Instruct", spec.name), spec.name)
    b = _Builder(spec, skip_missing)
    for i, row in enumerate(rows):
        qpath = (row.get("qry_img_path") or "").strip()
        qimg = _image_path(root, spec.name, qpath) if qpath else ""
        if qimg and not b.check_media([qimg], i, "query image"):
            continue
        texts = list(_need(row, "tgt_text", spec.name, i) or [])
        paths = list(row.get("tgt_img_path") or [])
        n = max(len(texts), len(paths))
        if n == 0:
            raise UserError(f"task {spec.name}: row {i} has no candidates")
        texts += [""] * (n - len(texts))
        paths += [""] * (n - len(paths))
        tinst = _strip_marker(row.get("tgt_inst") or "").strip()
        ids = []
        for t, p in zip(texts, paths):
            if spec.parser in ("cls", "qa", "i2t"):
                name, item = t, {"text": t, "key": t}
            else:
                full = _image_path(root, spec.name, p) if p else ""
                caption = t if spec.name in ("WebQA", "EDIS", "RefCOCO-Matching") else ""
                text = " ".join(x for x in (tinst, caption) if x)
                name = p if spec.parser == "t2i" else f"{p}:{t}".replace('"', "").replace("'", "")
                item = {"text": text, "key": p or t}
                if full:
                    item["images"] = [full]
            ids.append(b.cand(name, item))
        qtext = _query_text(spec.parser, row.get("qry_inst") or "", row.get("qry_text") or "", spec.name)
        query = {"text": qtext, "key": f"{qpath}||{(row.get('qry_text') or '').strip()}" if qpath
                 else (row.get("qry_text") or "").strip()}
        if qimg:
            query["images"] = [qimg]
        b.queries.append(query)
        b.local.append(ids)
        b.labels.append([b.names[ids[0]]])
    return b.done(local=True)


# ------------------------------------------------------------------------------------------ video
def _first(row: dict, fields: tuple[str, ...], task: str, i: int):
    for f in fields:
        if f in row and row[f] not in (None, ""):
            return row[f]
    raise UserError(f"task {task}: row {i} has none of the fields {list(fields)} (fields: {sorted(row)})")


def _video_id(value) -> str:
    value = str(value[0] if isinstance(value, list) else value)
    return os.path.splitext(os.path.basename(value.rstrip("/")))[0]


def read_video_task(spec: TaskSpec, root: str, *, skip_missing: bool = False) -> TaskData:
    rows = read_rows(os.path.join(root, "video-annotations", spec.name), spec.name)
    frames_root = os.path.join(root, "video-tasks", "frames", spec.frames_group, spec.name)
    b = _Builder(spec, skip_missing)

    def frames_of(vid: str, row: int) -> list[str] | None:
        folder = os.path.join(frames_root, vid)
        if not os.path.isdir(folder):
            b.check_media([folder], row, "frame folder")
            return None
        frames = choose_frames(folder)
        if not frames:
            raise UserError(f"task {spec.name}: row {row}: frame folder {folder} holds no images")
        return frames

    labels_file = os.path.join(root, "video-annotations", spec.name, "labels.txt")
    if spec.parser == "cls" and spec.pool == "global" and os.path.exists(labels_file):
        with open(labels_file, encoding="utf-8") as f:
            for lab in (line.strip() for line in f):
                if lab:
                    b.cand(lab, {"text": lab, "key": lab})
    for i, row in enumerate(rows):
        if spec.parser == "cls":
            vid = _video_id(_first(row, ("video_id", "video", "id"), spec.name, i))
            frames = frames_of(vid, i)
            if frames is None:
                continue
            label = str(_need(row, "pos_text", spec.name, i))
            inst = VIDEO_CLS_INSTRUCTION.get(spec.name, VIDEO_CLS_DEFAULT)
            b.queries.append({"text": inst, "video": frames, "key": vid})
            if spec.pool == "local":
                names = [str(x) for x in _need(row, "neg_text", spec.name, i)]
                b.local.append([b.cand(n, {"text": n, "key": n}) for n in names])
            else:
                b.cand(label, {"text": label, "key": label})
            b.labels.append([label])
        elif spec.parser == "ret":
            vid = _video_id(_first(row, ("video_id", "videoID", "id", "video", "video_path"), spec.name, i))
            caption = _first(row, ("caption", "enCap", "sentence"), spec.name, i)
            caption = str(caption[0] if isinstance(caption, list) else caption)
            frames = frames_of(vid, i)
            if frames is None:
                continue
            b.cand(vid, {"text": VIDEO_CANDIDATE_TEXT, "video": frames, "key": vid})
            b.queries.append({"text": f"{VIDEO_RET_INSTRUCTION} {caption}", "key": caption})
            b.labels.append([vid])
        elif spec.parser == "qa":
            vid = _video_id(_first(row, ("video_id", "video", "videoID", "video_name", "id"), spec.name, i))
            frames = frames_of(vid, i)
            if frames is None:
                continue
            question = str(_first(row, ("question",), spec.name, i))
            options = row.get("options") or row.get("option") or row.get("candidates") or \
                [row[f"a{k}"] for k in range(5) if f"a{k}" in row] or ["yes", "no"]
            options = [str(o) for o in options]
            answer = row.get("answer")
            names = options
            texts = [re.sub(r"^[A-Z]\.\s*", "", o) for o in options]
            if isinstance(answer, int) or (isinstance(answer, str) and answer.isdigit()):
                label = names[int(answer)]
            elif isinstance(answer, str) and len(answer) == 1 and answer.isalpha() and \
                    any(o.startswith(answer + ".") for o in options):
                label = next(o for o in options if o.startswith(answer + "."))
            else:
                label = str(answer)
            if label not in names:
                raise UserError(f"task {spec.name}: row {i}: answer {answer!r} is not among the options {names}")
            b.queries.append({"text": VIDEO_QA_INSTRUCTION + question + "\n" + "\n".join(options), "video": frames,
                              "key": f"{vid}||{question}"})
            b.local.append([b.cand(n, {"text": t, "key": t}) for n, t in zip(names, texts)])
            b.labels.append([label])
        elif spec.name == "MomentSeeker":  # clips listed in the row; several positives
            query_text = str(_first(row, ("query",), spec.name, i))
            clip_paths = []
            for field in ("positive_frames", "negative_frames"):
                for c in row.get(field) or []:
                    clip_paths.append(str(c["output_path"] if isinstance(c, dict) else c))
            n_pos = len(row.get("positive_frames") or [])
            if not n_pos:
                raise UserError(f"task {spec.name}: row {i} has no positive_frames")
            folders = [os.path.join(frames_root, os.path.splitext(c)[0]) for c in clip_paths]
            inp = str(row.get("input_frames") or "")
            query = {"text": f"{VIDEO_MRET_INSTRUCTION} {query_text}", "key": f"{inp}||{query_text}"}
            media = folders[:]
            if inp.lower().endswith(IMAGE_EXTS):
                query["images"] = [os.path.join(frames_root, inp)]
                media.append(query["images"][0])
            elif inp:
                media.append(os.path.join(frames_root, os.path.splitext(inp)[0]))
            if not b.check_media(media, i, "clip"):
                continue
            if inp and not inp.lower().endswith(IMAGE_EXTS):
                query["video"] = choose_frames(media[-1])
            names = [os.path.splitext(c)[0] for c in clip_paths]
            b.local.append([b.cand(nm, {"text": VIDEO_CANDIDATE_TEXT, "video": choose_frames(f), "key": nm})
                            for nm, f in zip(names, folders)])
            b.queries.append(query)
            b.labels.append(names[:n_pos])
        else:  # mret: <video>/query/ holds the query frames, the other subfolders are the clips
            vid = _video_id(_first(row, ("video_path", "video", "video_id"), spec.name, i))
            query_text = str(_first(row, ("query", "caption"), spec.name, i))
            folder = os.path.join(frames_root, vid)
            if not os.path.isdir(folder):
                b.check_media([folder], i, "frame folder")
                continue
            clips = sorted((d for d in os.listdir(folder) if d != "query" and os.path.isdir(os.path.join(folder, d))),
                           key=natural_key)
            positives = [c for c in clips if c.startswith("positive")]
            if not positives:
                raise UserError(f"task {spec.name}: row {i}: no positive* clip folder in {folder}")
            ids = [b.cand(f"{vid}/{c}", {"text": VIDEO_CANDIDATE_TEXT, "video": choose_frames(os.path.join(folder, c)),
                                          "key": f"{vid}/{c}"}) for c in clips]
            query = {"text": f"{VIDEO_MRET_INSTRUCTION} {query_text}", "key": f"{vid}||{query_text}"}
            if os.path.isdir(os.path.join(folder, "query")):
                query["video"] = choose_frames(os.path.join(folder, "query"))
            b.queries.append(query)
            b.local.append(ids)
            b.labels.append([f"{vid}/{c}" for c in positives])
    if not b.queries and not b.skipped:
        raise UserError(f"task {spec.name}: no rows")
    return b.done(local=spec.pool == "local")


# ------------------------------------------------------------------------------------------ visdoc
def visrag_image_name(name: str) -> str:
    stem, ext = os.path.splitext(name)
    return f"{stem[:50]}_{hashlib.md5(name.encode()).hexdigest()[:8]}{ext or '.png'}"


def _write_bytes(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def read_visdoc_task(spec: TaskSpec, root: str, *, skip_missing: bool = False) -> TaskData:
    base = os.path.join(root, "visdoc-tasks", spec.name)
    queries = read_rows(os.path.join(base, "queries"), spec.name, "queries")
    corpus = read_rows(os.path.join(base, "corpus"), spec.name, "corpus")
    qrels = read_rows(os.path.join(base, "qrels"), spec.name, "qrels")
    b = _Builder(spec, skip_missing)
    for i, row in enumerate(corpus):
        cid = str(_need(row, "corpus-id", spec.name, i))
        img = row.get("image")
        if isinstance(img, str) and img:
            path = img if os.path.isabs(img) else os.path.join(base, img)
        elif spec.name.startswith("VisRAG_"):
            path = os.path.join(base, "images", visrag_image_name(cid))
        else:
            path = os.path.join(base, "images", f"{cid}.png")
        if not os.path.exists(path) and isinstance(img, dict) and img.get("bytes"):
            _write_bytes(path, img["bytes"])  # parquet rows carry the page: write it once, as the loader does
        if not os.path.exists(path):
            raise TaskFileError(f"task {spec.name}: corpus page {cid}: image {path} does not exist")
        given_abs = isinstance(img, str) and os.path.isabs(img)
        key = path if given_abs else os.path.relpath(path, base)  # stable across copies of the data
        b.cand(cid, {"text": VISDOC_PAGE_TEXT, "images": [path], "key": key})
    grades: dict[str, dict[str, float]] = {}
    for i, row in enumerate(qrels):
        score = float(_need(row, "score", spec.name, i))
        if score > 0:
            q, c = str(_need(row, "query-id", spec.name, i)), str(_need(row, "corpus-id", spec.name, i))
            grades.setdefault(q, {})
            grades[q][c] = max(score, grades[q].get(c, score))
    for i, row in enumerate(queries):
        qid = str(_need(row, "query-id", spec.name, i))
        if qid not in grades:
            continue  # the official loader scores only queries with a positive qrel
        text = str(_need(row, "query", spec.name, i))
        b.queries.append({"text": VISDOC_QUERY.format(query=text), "key": text})
        b.labels.append(list(grades[qid]))
        b.grades.append(list(grades[qid].values()))
    return b.done(local=False, graded=True)


def read_task(spec: TaskSpec, root: str, *, skip_missing: bool = False) -> TaskData:
    """The task's queries, candidates and labels from a local MMEB-V2 copy under `root`."""
    reader = {"image": read_image_task, "video": read_video_task, "visdoc": read_visdoc_task}[spec.modality]
    return reader(spec, os.fspath(root), skip_missing=skip_missing)


def describe(data: TaskData) -> dict[str, Any]:
    return {"task": data.name, "queries": len(data.queries), "candidates": len(data.cands),
            "pool": "local" if data.local is not None else "global", "skipped": data.skipped}
