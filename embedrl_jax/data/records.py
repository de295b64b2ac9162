"""Training-pair records and readers for MMEB-train and LLaVA-Hound JSON (method ref. §9).

A :class:`PairRecord` is one (query, positive) training pair. Its ``query``, ``positive`` and
``negatives`` are Embedder *items*: plain dicts with the optional keys

- ``text`` (str): the query/candidate text, instruction included as the dataset gives it;
- ``images`` (list): image references, each a path (str), an HxWxC uint8 array or a PIL image;
- ``video`` (list): frames in playback order, each a path/array/PIL image;
- ``instruction`` (str): an extra instruction (the readers never set it: MMEB puts it in ``qry``);
- ``tcot`` (str): a T-CoT completion (``<thinking>..</thinking><rethink>..</rethink><answer>..``).

Readers only produce items whose media are **absolute paths** (strings), so records are cheap and
serialisable (:meth:`PairRecord.to_json`); pixels are read later with :func:`load_image`. Keys with
empty values are left out (an image-only positive has no ``text`` key, a record without a T-CoT no
``tcot`` key).

Validation and skipping
-----------------------
Both readers check every record. A bad record raises :class:`RecordError` naming the record file,
the 0-based record index, the field and (for media) the offending file. With ``skip_bad=True`` the
record is dropped instead and counted in the returned :class:`SkipReport`. Both modes return
``(records, report)``. Reasons:

- ``bad_json``: a JSONL line that does not parse; ``bad_record``: a record that is not an object;
- ``bad_field``: a field of the wrong type (e.g. ``qry`` not a string);
- ``missing_query``: no query text and no query image/video;
- ``missing_positive``: no positive text and no positive image/video;
- ``unknown_task``: (LLaVA-Hound) ``dataset_name`` names none of video_retrieval/caption/qa;
- ``missing_image``: a referenced image/frame file does not exist (or is not a file);
- ``corrupt_image``: it exists but PIL cannot read it (``check_images`` sets how deep we look).

``check_images`` is ``"exists"`` (stat only), ``"header"`` (default: PIL parses the header, catches
non-images and truncated headers at ~50 µs a file) or ``"decode"`` (full decode, also catches
truncated pixel data; slow). Results are cached per path within one call.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal, Mapping, Sequence

import numpy as np
from PIL import Image

from ..errors import UserError

__all__ = [
    "PairRecord",
    "RecordError",
    "SkipReport",
    "load_image",
    "read_mmeb",
    "read_llavahound",
    "read_pairs",
    "pair_parser",
    "is_llavahound",
    "iter_json_records",
    "file_roots",
    "video_task",
]

CheckImages = Literal["exists", "header", "decode"]
_CHECK_MODES = ("exists", "header", "decode")
_IMAGE_MARKER = re.compile(r"<\|image_\d+\|>")
_VIDEO_MARKER = re.compile(r"<video>")
_MEDIA_KEYS = ("images", "video")


class RecordError(UserError):
    """A bad training record or an unreadable image.

    Attributes: ``source`` (record file), ``index`` (0-based record index), ``field`` (the record
    field), ``file`` (the media file involved, if any) and ``reason`` (one of the reasons listed in
    the module docstring).
    """

    def __init__(self, message: str, *, source: str | None = None, index: int | None = None,
                 field: str | None = None, file: str | None = None, reason: str = "bad_record"):
        self.source, self.index, self.field, self.file, self.reason = source, index, field, file, reason
        parts = []
        if source is not None:
            parts.append(str(source))
        if index is not None:
            parts.append(f"record {index}")
        if field is not None:
            parts.append(f"field {field!r}")
        prefix = ": ".join(parts)
        super().__init__(f"{prefix}: {message}" if prefix else message)


@dataclass
class SkipReport:
    """What a reader kept and skipped. ``counts`` maps a reason to the number of records skipped for
    it; ``examples`` holds the first error messages (at most ``max_examples`` per reason)."""

    source: str = ""
    total: int = 0
    kept: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)
    max_examples: int = 3

    @property
    def skipped(self) -> int:
        return sum(self.counts.values())

    def add(self, err: RecordError) -> None:
        n = self.counts.get(err.reason, 0)
        self.counts[err.reason] = n + 1
        if n < self.max_examples:
            self.examples.append(str(err))

    def __str__(self) -> str:
        if not self.counts:
            return f"{self.source}: kept {self.kept}/{self.total} records"
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.counts.items()))
        return f"{self.source}: kept {self.kept}/{self.total} records, skipped {self.skipped} ({reasons})"


def _item_to_json(item: Mapping[str, Any], what: str) -> dict:
    out: dict[str, Any] = {}
    for k, v in item.items():
        if k in _MEDIA_KEYS:
            refs = []
            for ref in v:
                if isinstance(ref, os.PathLike):
                    ref = os.fspath(ref)
                if not isinstance(ref, str):
                    raise TypeError(
                        f"{what}[{k!r}] holds a {type(ref).__name__}; only paths (str) can be serialised: "
                        "write in-memory images to files first")
                refs.append(ref)
            out[k] = refs
        elif v is None or isinstance(v, (str, int, float, bool)):
            out[k] = v
        else:
            raise TypeError(f"{what}[{k!r}] has a non-JSON value of type {type(v).__name__}")
    return out


@dataclass(frozen=True)
class PairRecord:
    """One (query, positive) training pair; see the module docstring for the item schema.

    ``key`` identifies the record (readers use ``"{dataset}/{record index}"``); ``is_video`` marks
    pairs from video datasets (the sampler caps video sub-batches). Equality compares all fields;
    the hash uses ``(dataset, key)`` only (items are dicts).
    """

    query: dict
    positive: dict
    negatives: tuple[dict, ...] = ()
    dataset: str = ""
    key: str = ""
    is_video: bool = False

    def __post_init__(self):
        if not isinstance(self.negatives, tuple):
            object.__setattr__(self, "negatives", tuple(self.negatives))

    def __hash__(self) -> int:
        return hash((self.dataset, self.key))

    def to_dict(self) -> dict:
        """A JSON-safe dict (media must be paths; raises ``TypeError`` on arrays/PIL images)."""
        return {
            "query": _item_to_json(self.query, "query"),
            "positive": _item_to_json(self.positive, "positive"),
            "negatives": [_item_to_json(n, f"negatives[{i}]") for i, n in enumerate(self.negatives)],
            "dataset": self.dataset,
            "key": self.key,
            "is_video": bool(self.is_video),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "PairRecord":
        return cls(query=dict(d["query"]), positive=dict(d["positive"]),
                   negatives=tuple(dict(n) for n in d.get("negatives", ())),
                   dataset=str(d.get("dataset", "")), key=str(d.get("key", "")),
                   is_video=bool(d.get("is_video", False)))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, s: str | bytes) -> "PairRecord":
        if isinstance(s, (bytes, bytearray, memoryview)):
            s = bytes(s).decode("utf-8")
        return cls.from_dict(json.loads(s))


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------

def _to_rgb(img):
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return img.convert("RGB")


def load_image(ref) -> "Image.Image":
    """An image reference (path, HxW/HxWxC uint8 array, PIL image) -> an RGB PIL image.

    Transparent images are composited onto white. A missing path raises :class:`RecordError` with
    ``reason="missing_image"``; an unreadable/corrupt file ``reason="corrupt_image"``; both name the
    path. Arrays must be uint8 (or bool) with 1, 3 or 4 channels, else ``ValueError``.
    """
    if isinstance(ref, Image.Image):
        return _to_rgb(ref)
    if isinstance(ref, np.ndarray):
        arr = ref
        if arr.dtype == np.bool_:
            arr = arr.astype(np.uint8) * 255
        if arr.dtype != np.uint8:
            raise ValueError(f"image arrays must be uint8, got {arr.dtype} with shape {arr.shape}")
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        if arr.ndim == 2:
            return Image.fromarray(arr, mode="L").convert("RGB")
        if arr.ndim == 3 and arr.shape[-1] in (3, 4):
            return _to_rgb(Image.fromarray(np.ascontiguousarray(arr)))
        raise ValueError(f"image arrays must be HxW or HxWxC with C in (1, 3, 4), got shape {arr.shape}")
    if isinstance(ref, (str, os.PathLike)):
        path = os.fspath(ref)
        if not os.path.isfile(path):
            raise RecordError(f"image file not found: {path}", file=path, reason="missing_image")
        try:
            with Image.open(path) as img:
                img.load()
                return _to_rgb(img)
        except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ...
            raise RecordError(f"cannot read image file {path}: {type(e).__name__}: {e}", file=path,
                              reason="corrupt_image") from e
    raise TypeError(f"unsupported image reference of type {type(ref).__name__}")


def _check_image_file(path: str, mode: str) -> tuple[str, str] | None:
    """None if ``path`` passes the ``mode`` check, else (reason, message)."""
    if not os.path.isfile(path):
        return "missing_image", f"image file not found: {path}"
    if mode == "exists":
        return None
    try:
        with Image.open(path) as img:
            if mode == "decode":
                img.load()
            else:
                _ = img.size
    except Exception as e:
        return "corrupt_image", f"cannot read image file {path}: {type(e).__name__}: {e}"
    return None


class _Checker:
    def __init__(self, source: str, mode: str):
        if mode not in _CHECK_MODES:
            raise ValueError(f"check_images must be one of {_CHECK_MODES}, got {mode!r}")
        self.source, self.mode, self.cache = source, mode, {}

    def __call__(self, path: str, index: int, field_name: str) -> None:
        res = self.cache.get(path, ...)
        if res is ...:
            res = self.cache[path] = _check_image_file(path, self.mode)
        if res is not None:
            reason, msg = res
            raise RecordError(msg, source=self.source, index=index, field=field_name, file=path,
                              reason=reason)


# --------------------------------------------------------------------------------------------
# Shared reading helpers
# --------------------------------------------------------------------------------------------

def _iter_raw(path: str) -> Iterator[tuple[int, Any, int | None]]:
    """(index, record-or-RecordError, line number or None) for a JSON array or a JSONL file."""
    with open(path, "r", encoding="utf-8") as f:
        text = f.read()
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise RecordError(f"not valid JSON: {e}", source=path, reason="bad_json") from e
        for i, rec in enumerate(data):
            yield i, rec, None
        return
    i = 0
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield i, json.loads(line), lineno
        except json.JSONDecodeError as e:
            yield i, RecordError(f"line {lineno} is not valid JSON: {e}", source=path, index=i,
                                 reason="bad_json"), lineno
        i += 1


def iter_json_records(path) -> Iterator[tuple[int, Any, int | None]]:
    """The records of a JSON-array or JSONL file: ``(index, record, line)`` with ``line`` the 1-based
    JSONL line (None in an array); a JSONL line that does not parse comes as a :class:`RecordError`
    in place of its record, an array that does not parse raises one."""
    return _iter_raw(os.fspath(path))


def _resolve(p: str, base: str) -> str:
    p = os.path.expanduser(p)
    if not os.path.isabs(p):
        p = os.path.join(base, p)
    return os.path.normpath(p)


def _get_text(rec: Mapping, key: str, source: str, index: int) -> str:
    v = rec.get(key)
    if v is None:
        return ""
    if not isinstance(v, str):
        raise RecordError(f"expected a string, got {type(v).__name__}", source=source, index=index,
                          field=key, reason="bad_field")
    return v


def _get_paths(v: Any, key: str, source: str, index: int) -> list[str]:
    if v is None:
        return []
    if isinstance(v, str):
        return [v] if v.strip() else []
    if isinstance(v, (list, tuple)) and all(isinstance(p, str) for p in v):
        return [p for p in v if p.strip()]
    raise RecordError(f"expected a path or a list of paths, got {type(v).__name__}", source=source,
                      index=index, field=key, reason="bad_field")


def _item(text: str = "", images: Sequence[str] = (), video: Sequence[str] = (), tcot: str = "") -> dict:
    item: dict[str, Any] = {}
    if text:
        item["text"] = text
    if images:
        item["images"] = list(images)
    if video:
        item["video"] = list(video)
    if tcot and tcot.strip():
        item["tcot"] = tcot.strip()
    return item


def _read(path, parse_one, skip_bad: bool) -> tuple[list[PairRecord], SkipReport]:
    path = os.fspath(path)
    report = SkipReport(source=path)
    records: list[PairRecord] = []
    for i, raw, _ in _iter_raw(path):
        report.total += 1
        try:
            if isinstance(raw, RecordError):
                raise raw
            if not isinstance(raw, dict):
                raise RecordError(f"expected a JSON object, got {type(raw).__name__}", source=path, index=i,
                                  reason="bad_record")
            records.append(parse_one(i, raw))
        except RecordError as e:
            if not skip_bad:
                raise
            report.add(e)
    report.kept = len(records)
    return records, report


def _default_name(path: str) -> str:
    name = os.path.basename(path)
    for ext in (".jsonl", ".json"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return os.path.splitext(name)[0]


# --------------------------------------------------------------------------------------------
# MMEB-train
# --------------------------------------------------------------------------------------------

def _base(root, path: str) -> str:
    return os.fspath(root) if root not in (None, "") else os.path.dirname(os.path.abspath(path))


def _mmeb_parser(path: str, name: str, base: str, check: "_Checker", negatives: bool):
    def images(rec, key, i):
        out = []
        for p in _get_paths(rec.get(key), key, path, i):
            full = _resolve(p, base)
            check(full, i, key)
            out.append(full)
        return out

    def parse_one(i: int, rec: dict) -> PairRecord:
        qtext = _IMAGE_MARKER.sub("", _get_text(rec, "qry", path, i)).strip()
        qimgs = images(rec, "qry_image_path", i)
        if not qtext and not qimgs:
            raise RecordError("record has no query: empty 'qry' text and no 'qry_image_path'", source=path,
                              index=i, field="qry", reason="missing_query")
        ptext = _get_text(rec, "pos_text", path, i).strip()
        pimgs = images(rec, "pos_image_path", i)
        if not ptext and not pimgs:
            raise RecordError("record has no positive: empty 'pos_text' and no 'pos_image_path'", source=path,
                              index=i, field="pos_text", reason="missing_positive")
        negs: tuple[dict, ...] = ()
        if negatives:
            ntext = _get_text(rec, "neg_text", path, i).strip()
            nimgs = images(rec, "neg_image_path", i)
            if ntext or nimgs:
                negs = (_item(ntext, nimgs),)
        return PairRecord(
            query=_item(qtext, qimgs, tcot=_get_text(rec, "query_cot", path, i)),
            positive=_item(ptext, pimgs, tcot=_get_text(rec, "pos_cot", path, i)),
            negatives=negs, dataset=name, key=f"{name}/{i}", is_video=False)

    return parse_one


def read_mmeb(path, *, dataset: str | None = None, skip_bad: bool = False, image_root=None,
              check_images: CheckImages = "header", negatives: bool = True,
              ) -> tuple[list[PairRecord], SkipReport]:
    """Read an MMEB-train style file (a JSON list or JSONL, one record per pair).

    Fields: ``qry``, ``qry_image_path``, ``pos_text``, ``pos_image_path``, optional ``neg_text``,
    ``neg_image_path``, ``query_cot``, ``pos_cot``, ``error`` (ignored: a failed synthesis has empty
    CoTs). Image fields may be a path or a list of paths; empty strings mean "no image".

    - query = ``{text: qry without <|image_N|> markers, stripped; images: [qry_image_path];
      tcot: query_cot}``; positive = ``{text: pos_text; images: [pos_image_path]; tcot: pos_cot}``;
      negatives = ``({text: neg_text, images: [neg_image_path]},)`` when present and ``negatives``.
      Empty values are omitted from the items.
    - Relative image paths resolve against ``image_root`` if given, else the record file's folder.
    - ``dataset`` defaults to the file name without ``.json``/``.jsonl``; keys are
      ``"{dataset}/{index}"``; ``is_video=False``.

    Returns ``(records, SkipReport)``; raises :class:`RecordError` on the first bad record unless
    ``skip_bad`` (see the module docstring for the reasons).
    """
    path = os.fspath(path)
    name = dataset if dataset is not None else _default_name(path)
    parse = _mmeb_parser(path, name, _base(image_root, path), _Checker(path, check_images), negatives)
    return _read(path, parse, skip_bad)


# --------------------------------------------------------------------------------------------
# LLaVA-Hound video
# --------------------------------------------------------------------------------------------

VideoTask = Literal["video_retrieval", "caption", "qa"]


def video_task(dataset_name: str) -> str | None:
    """The LLaVA-Hound task of a subset name: ``"video_retrieval"`` if the name contains
    "video_retrieval", else ``"caption"`` if it contains "caption", else ``"qa"`` if it contains
    "qa" (case-insensitive); None otherwise. So ``llavahound_caption_retrieval_3`` is a caption
    (video -> caption) task and ``llavahound_video_retrieval_1`` a text -> video task."""
    n = (dataset_name or "").lower()
    if "video_retrieval" in n:
        return "video_retrieval"
    if "caption" in n:
        return "caption"
    if "qa" in n:
        return "qa"
    return None


def _turn(conversations, role: str) -> str:
    for turn in conversations:
        if isinstance(turn, dict) and turn.get("from") == role:
            v = turn.get("value")
            return v if isinstance(v, str) else ""
    return ""


def _hound_parser(path: str, name: str, base: str, check: "_Checker", task):
    def side(rec: dict, key: str, i: int) -> tuple[list, list[str]]:
        s = rec.get(key)
        if s is None:
            return [], []
        if not isinstance(s, dict):
            raise RecordError(f"expected an object, got {type(s).__name__}", source=path, index=i, field=key,
                              reason="bad_field")
        conv = s.get("conversations") or []
        if not isinstance(conv, list):
            raise RecordError("expected a list of turns", source=path, index=i, field=f"{key}.conversations",
                              reason="bad_field")
        frames = []
        for j, p in enumerate(_get_paths(s.get("video"), f"{key}.video", path, i)):
            full = _resolve(p, base)
            check(full, i, f"{key}.video[{j}]")
            frames.append(full)
        return conv, frames

    def parse_one(i: int, rec: dict) -> PairRecord:
        dname = rec.get("dataset_name")
        t = task or video_task(dname if isinstance(dname, str) and dname else name)
        if t not in ("video_retrieval", "caption", "qa"):
            raise RecordError(f"cannot tell the task from dataset_name {dname!r} (expected it to contain "
                              "'video_retrieval', 'caption' or 'qa'; or pass task=...)", source=path, index=i,
                              field="dataset_name", reason="unknown_task")
        q_role, p_role = ("gpt", "human") if t == "video_retrieval" else ("human", "gpt")
        qconv, qframes = side(rec, "qry", i)
        qtext = _VIDEO_MARKER.sub("", _turn(qconv, q_role)).strip()
        if not qtext and not qframes:
            raise RecordError(f"record has no query: no '{q_role}' turn text and no frames", source=path,
                              index=i, field="qry", reason="missing_query")
        pconv, pframes = side(rec, "pos", i)
        ptext = _VIDEO_MARKER.sub("", _turn(pconv, p_role)).strip()
        if not ptext and not pframes:
            raise RecordError(f"record has no positive: no '{p_role}' turn text and no frames", source=path,
                              index=i, field="pos", reason="missing_positive")
        return PairRecord(
            query=_item(qtext, video=qframes, tcot=_get_text(rec, "query_cot", path, i)),
            positive=_item(ptext, video=pframes, tcot=_get_text(rec, "pos_cot", path, i)),
            negatives=(), dataset=name, key=f"{name}/{i}", is_video=True)

    return parse_one


def read_llavahound(path, *, frames_dir=None, dataset: str | None = None, skip_bad: bool = False,
                    task: VideoTask | None = None, check_images: CheckImages = "header",
                    ) -> tuple[list[PairRecord], SkipReport]:
    """Read a LLaVA-Hound style video file (JSON list or JSONL).

    Record: ``{"qry": {"conversations": [{"from": "human"|"gpt", "value": ...}, ...],
    "video": [frame paths]}, "pos": {...}, "query_cot", "pos_cot", "dataset_name"}``.

    The task comes from ``task`` if given, else from the record's ``dataset_name`` (falling back to
    ``dataset``/the file name) via :func:`video_task`:

    - ``video_retrieval`` (text -> video): query text = the ``gpt`` turn of ``qry``; positive text =
      the ``human`` turn of ``pos`` (usually just ``<video>``, so empty);
    - ``caption`` / ``qa`` (video -> text): query text = the ``human`` turn of ``qry``; positive
      text = the ``gpt`` turn of ``pos``.

    ``<video>`` markers are removed from texts. Each side's ``video`` frames (if any) become the
    item's ``video`` list; relative frame paths resolve against ``frames_dir`` if given, else the
    record file's folder. Query and positive must each have text or frames. ``dataset`` defaults to
    the file name; keys are ``"{dataset}/{index}"``; ``is_video=True``. Returns ``(records,
    SkipReport)`` with the same validation/skip rules as :func:`read_mmeb`.
    """
    path = os.fspath(path)
    name = dataset if dataset is not None else _default_name(path)
    parse = _hound_parser(path, name, _base(frames_dir, path), _Checker(path, check_images), task)
    return _read(path, parse, skip_bad)


# --------------------------------------------------------------------------------------------
# Either format, and the roots of a data file
# --------------------------------------------------------------------------------------------

def is_llavahound(rec: Mapping) -> bool:
    """A LLaVA-Hound record has its sides as objects (``qry``/``pos`` with ``conversations`` and
    ``video``); an MMEB-train record has ``qry`` as a string."""
    return isinstance(rec.get("qry"), dict) or isinstance(rec.get("pos"), dict)


def pair_parser(path, *, dataset: str | None = None, image_root=None, frames_root=None,
                check_images: CheckImages = "header", negatives: bool = True):
    """``parse(index, record) -> PairRecord`` for one file whose records may be MMEB-train or
    LLaVA-Hound (told apart record by record with :func:`is_llavahound`); MMEB image paths resolve
    against ``image_root``, LLaVA-Hound frame paths against ``frames_root`` (each: the file's folder
    when None). Raises :class:`RecordError` (file, record index, field) on a bad record."""
    path = os.fspath(path)
    name = dataset if dataset is not None else _default_name(path)
    check = _Checker(path, check_images)
    mmeb = _mmeb_parser(path, name, _base(image_root, path), check, negatives)
    hound = _hound_parser(path, name, _base(frames_root, path), check, None)
    return lambda i, rec: (hound if is_llavahound(rec) else mmeb)(i, rec)


def read_pairs(path, *, dataset: str | None = None, skip_bad: bool = False, image_root=None, frames_root=None,
               check_images: CheckImages = "header", negatives: bool = True,
               ) -> tuple[list[PairRecord], SkipReport]:
    """Read a pair file in either official format (JSON array or JSONL; MMEB-train or LLaVA-Hound
    records, see :func:`pair_parser`), with the validation and skip rules of :func:`read_mmeb`."""
    path = os.fspath(path)
    parse = pair_parser(path, dataset=dataset, image_root=image_root, frames_root=frames_root,
                        check_images=check_images, negatives=negatives)
    return _read(path, parse, skip_bad)


def file_roots(path, cfg) -> tuple[str | None, str | None]:
    """(image root, frames root) of one data file from a data config's ``image_root``/``frames_root``
    (the global defaults) and ``image_roots``/``frames_roots`` (per file: keyed by the dataset name,
    i.e. the file name without .json/.jsonl, or by the path as written in the config). None means
    the file's own folder (the behaviour without roots)."""
    path = os.fspath(path)
    keys = (path, _default_name(path))

    def pick(per_file, default):
        for k in keys:
            if per_file.get(k):
                return os.path.expanduser(per_file[k])
        return os.path.expanduser(default) if default else None

    return pick(cfg.image_roots, cfg.image_root), pick(cfg.frames_roots, cfg.frames_root)


def read_rl_files(cfg) -> tuple[list[list], list[str], dict[str, int]]:
    """The RL pair files -> (records per file, dataset names, skipped per dataset). Each file is a
    JSON array or JSONL of MMEB-train or LLaVA-Hound records, its relative media under its roots.
    `cfg`: the RL data config (files, skip_bad and the media roots `file_roots` reads)."""
    sources, names, skipped = [], [], {}
    for path in cfg.files:
        image_root, frames_root = file_roots(path, cfg)
        records, report = read_pairs(path, skip_bad=cfg.skip_bad, image_root=image_root,
                                     frames_root=frames_root, negatives=False)
        if not records:
            raise UserError(f"{path}: no usable pairs ({report})")
        name = os.path.splitext(os.path.basename(str(path)))[0]
        sources.append(records)
        names.append(name)
        skipped[name] = report.skipped
    return sources, names, skipped
