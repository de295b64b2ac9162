"""SFT samples for the Reasoner's cold start: readers, validation and the step order.

Every sample is one Reasoner prompt item and one completion (a T-CoT
``<thinking>..{json}</thinking><rethink>..</rethink><answer>..</answer>``).

Data: files holding a JSON array or JSONL, each record one of
  (a) ``{"prompt": str, "completion": str, "images": [paths]?, "video": [frame paths]?}``:
      ``prompt`` is the rendered user text;
  (b) an MMEB-train record (``qry`` a string) or a LLaVA-Hound record (``qry``/``pos`` objects with
      ``conversations`` and ``video``), read by `records.pair_parser`: up to two samples, the query
      side with ``query_cot`` and the positive side with ``pos_cot``, prompts from
      `prompts.reasoner_prompt` (a text query whose positive is a video gets the video-retrieval
      prompt). A side without a T-CoT gives no sample (counted as ``no_tcot``; failed syntheses have
      empty CoTs).
Relative image paths resolve against the file's image root, frame paths (LLaVA-Hound ``video``,
(a)'s ``video``) against its frames root (``records.file_roots``: per file, else the global
``data.image_root`` / ``data.frames_root``, else the file's own folder). Bad records raise
`RecordError` naming the file, the line (JSONL) or record index (JSON array) and the field, or are
skipped and counted with ``data.skip_bad``.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import MissingFileError, UserError
from ..prompts import load_prompts, reasoner_prompt
from .records import RecordError, file_roots, iter_json_records, pair_parser
from .toy import make_toy_retrieval

__all__ = ["SFTDataConfig", "SFTSample", "SFTDataReport", "load_sft_samples", "toy_sft_files", "SampleOrder"]


@dataclasses.dataclass(frozen=True)
class SFTDataConfig:
    files: tuple[str, ...] = ()  # JSON-array or JSONL files: (a) prompt/completion, (b) MMEB or LLaVA-Hound records
    prompts: str | None = None  # prompt templates for MMEB records (None: the packaged defaults)
    skip_bad: bool = False  # skip and count bad records instead of failing
    toy: bool = False  # also train on the T-CoTs of the bundled toy retrieval set (built under WORKDIR/data)
    # where relative media paths resolve (None: each file's own folder)
    image_root: str | None = None  # image paths, every file
    frames_root: str | None = None  # video frame paths, every file
    image_roots: dict[str, str] = dataclasses.field(default_factory=dict)  # per file (dataset name or path)
    frames_roots: dict[str, str] = dataclasses.field(default_factory=dict)  # per file (dataset name or path)


@dataclasses.dataclass(frozen=True)
class SFTSample:
    prompt: dict  # Reasoner prompt item: {"text", "images"?, "video"?}
    completion: str
    source: str  # "file: line N" (and the side for MMEB records)


@dataclasses.dataclass
class SFTDataReport:
    """What the readers kept: samples, skipped bad lines (by reason), MMEB sides without a T-CoT."""

    samples: int = 0
    lines: int = 0
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)
    examples: list[str] = dataclasses.field(default_factory=list)
    no_tcot: int = 0
    truncated: int = 0  # completions longer than max_completion_tokens (filled in by the trainer)

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())

    def add(self, err: RecordError) -> None:
        n = self.skipped.get(err.reason, 0)
        self.skipped[err.reason] = n + 1
        if n < 3:
            self.examples.append(str(err))

    def __str__(self) -> str:
        out = f"{self.samples} samples from {self.lines} lines"
        if self.skipped:
            out += ", skipped " + ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items()))
        if self.no_tcot:
            out += f", {self.no_tcot} MMEB sides without a T-CoT"
        if self.truncated:
            out += f", {self.truncated} completions truncated"
        return out


def _bad(path, where: str, msg: str, reason: str, field: str | None = None) -> RecordError:
    err = RecordError(f"{where}: {msg}", source=os.fspath(path), reason=reason)
    err.field = field
    return err


def _media_paths(raw, key, path, where, base) -> list[str]:
    v = raw.get(key)
    if v is None:
        return []
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(p, str) for p in v):
        raise _bad(path, where, f"field {key!r}: expected a list of paths", "bad_field", key)
    out = []
    for p in v:
        full = os.path.normpath(p if os.path.isabs(p) else os.path.join(base, os.path.expanduser(p)))
        if not os.path.isfile(full):
            raise _bad(path, where, f"field {key!r}: image file not found: {full}", "missing_image", key)
        out.append(full)
    return out


def _plain_sample(raw: dict, path, where: str, image_base: str, frames_base: str) -> SFTSample:
    prompt = raw.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise _bad(path, where, "field 'prompt': expected a non-empty string", "missing_prompt", "prompt")
    if "completion" not in raw or raw["completion"] is None:
        raise _bad(path, where, "field 'completion' is missing", "missing_completion", "completion")
    completion = raw["completion"]
    if not isinstance(completion, str):
        raise _bad(path, where, f"field 'completion': expected a string, got {type(completion).__name__}",
                   "bad_field", "completion")
    if not completion.strip():
        raise _bad(path, where, "field 'completion' is empty", "empty_completion", "completion")
    item: dict[str, Any] = {"text": prompt}
    images = _media_paths(raw, "images", path, where, image_base)
    video = _media_paths(raw, "video", path, where, frames_base)
    if images:
        item["images"] = images
    if video:
        item["video"] = video
    return SFTSample(item, completion.strip(), f"{path}: {where}")


def _pair_samples(rec, path: str, where: str, prompts, report: SFTDataReport) -> list[SFTSample]:
    out = []
    for side, item in (("query", rec.query), ("positive", rec.positive)):
        tcot = item.get("tcot")
        if not tcot:
            report.no_tcot += 1
            continue
        plain = {key: v for key, v in item.items() if key != "tcot"}
        prompt = reasoner_prompt(plain, side, prompts,
                                 retrieves_video=side == "query" and bool(rec.positive.get("video")))
        out.append(SFTSample(prompt, tcot, f"{path}: {where} ({side})"))
    return out


def _read_file(path: str, cfg: SFTDataConfig, prompts, report: SFTDataReport) -> list[SFTSample]:
    image_root, frames_root = file_roots(path, cfg)
    here = os.path.dirname(os.path.abspath(path))
    parse_pair = pair_parser(path, dataset=Path(path).stem, image_root=image_root, frames_root=frames_root,
                             negatives=False)
    samples: list[SFTSample] = []
    for i, raw, line in iter_json_records(path):
        report.lines += 1
        where = f"line {line}" if line is not None else f"record {i}"
        try:
            if isinstance(raw, RecordError):
                raise _bad(path, where, "not valid JSON: " + str(raw).split("not valid JSON: ", 1)[-1], "bad_json")
            if not isinstance(raw, dict):
                raise _bad(path, where, f"expected a JSON object, got {type(raw).__name__}", "bad_record")
            if "qry" in raw or "pos" in raw:
                try:
                    rec = parse_pair(i, raw)
                except RecordError as e:  # "<path>: record i: ..." -> "<path>: line N: ..."
                    err = RecordError(str(e).replace(f"{path}: record {i}", f"{path}: {where}", 1), reason=e.reason)
                    err.source, err.index, err.field, err.file = e.source, e.index, e.field, e.file
                    raise err from None
                samples += _pair_samples(rec, path, where, prompts, report)
            elif "prompt" in raw or "completion" in raw:
                samples.append(_plain_sample(raw, path, where, image_root or here, frames_root or here))
            else:
                raise _bad(path, where, "neither an SFT sample ('prompt', 'completion') nor an MMEB/LLaVA-Hound "
                           "record ('qry', 'pos')", "bad_record")
        except RecordError as e:
            if not cfg.skip_bad:
                raise
            report.add(e)
    return samples


def load_sft_samples(cfg: SFTDataConfig, files=None) -> tuple[list[SFTSample], SFTDataReport]:
    """Read the SFT files (`files` overrides `cfg.files`) into samples, in file and record order."""
    prompts = load_prompts(cfg.prompts)
    report = SFTDataReport()
    samples: list[SFTSample] = []
    for path in (cfg.files if files is None else files):
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise MissingFileError(f"data file {path}: no such file")
        samples += _read_file(path, cfg, prompts, report)
    report.samples = len(samples)
    return samples, report


def toy_sft_files(workdir) -> list[str]:
    """The MMEB train files of the bundled toy retrieval set (built under WORKDIR/data)."""
    manifest = make_toy_retrieval(Path(workdir) / "data")
    return [d["path"] for d in manifest["datasets"].values() if d["format"] == "mmeb" and d["split"] == "train"]


class SampleOrder:
    """Which samples a step trains on: a pure function of (seed, step).

    Sample positions run through an endless stream of epochs, each one permutation of the N
    samples drawn from ``np.random.default_rng([seed, epoch])``; step s takes positions
    s*B .. s*B + B - 1. The data iterator state is therefore just the step.
    """

    def __init__(self, n: int, batch_size: int, seed: int):
        if n < 1:
            raise UserError("no SFT samples")
        self.n, self.batch_size, self.seed = int(n), int(batch_size), int(seed)
        self._perms: dict[int, np.ndarray] = {}

    def permutation(self, epoch: int) -> np.ndarray:
        epoch = int(epoch)
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.clear()
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return self._perms[epoch]

    def indices(self, step: int) -> np.ndarray:
        pos = np.arange(step * self.batch_size, (step + 1) * self.batch_size)
        return np.array([self.permutation(int(p // self.n))[int(p % self.n)] for p in pos], np.int64)

    def state(self, step: int) -> dict:
        pos = step * self.batch_size
        return {"step": int(step), "epoch": int(pos // self.n), "offset": int(pos % self.n), "num_samples": self.n}
