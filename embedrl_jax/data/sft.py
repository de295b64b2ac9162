"""SFT samples for the Reasoner's cold start: readers, validation and the step order.

Every sample is one Reasoner prompt item and one completion (a T-CoT
``<thinking>..{json}</thinking><rethink>..</rethink><answer>..</answer>``).

Data: JSONL files, each line one of
  (a) ``{"prompt": str, "completion": str, "images": [paths]?, "video": [frame paths]?}``:
      ``prompt`` is the rendered user text; relative media paths resolve against the file's folder;
  (b) an MMEB-train record (it has ``qry``): up to two samples, the query side with ``query_cot``
      and the positive side with ``pos_cot``, prompts from `prompts.reasoner_prompt`. A side without
      a T-CoT gives no sample (counted as ``no_tcot``; failed syntheses have empty CoTs).
Bad lines raise `RecordError` naming the file and line, or are skipped and counted with
``data.skip_bad``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import MissingFileError, UserError
from ..prompts import load_prompts, reasoner_prompt
from .records import RecordError, read_mmeb
from .toy import make_toy_retrieval

__all__ = ["SFTDataConfig", "SFTSample", "SFTDataReport", "load_sft_samples", "toy_sft_files", "SampleOrder"]


@dataclasses.dataclass(frozen=True)
class SFTDataConfig:
    files: tuple[str, ...] = ()  # JSONL files of SFT samples ((a) prompt/completion or (b) MMEB records)
    prompts: str | None = None  # prompt templates for MMEB records (None: the packaged defaults)
    skip_bad: bool = False  # skip and count bad lines instead of failing
    toy: bool = False  # also train on the T-CoTs of the bundled toy retrieval set (built under WORKDIR/data)



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


def _plain_sample(raw: dict, path, where: str, base: str) -> SFTSample:
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
    images = _media_paths(raw, "images", path, where, base)
    video = _media_paths(raw, "video", path, where, base)
    if images:
        item["images"] = images
    if video:
        item["video"] = video
    return SFTSample(item, completion.strip(), f"{path}: {where}")


def _mmeb_samples(path, entries, cfg: SFTDataConfig, prompts, report: SFTDataReport) -> dict[int, list[SFTSample]]:
    """MMEB lines of one file -> {entry index: samples}, read by `read_mmeb` (entries: [(where, record)])."""
    path = os.fspath(path)
    with tempfile.TemporaryDirectory(prefix="embedrl-sft-") as d:
        tmp = os.path.join(d, "mmeb.jsonl")  # read_mmeb reads files: the MMEB lines of a mixed file, in order
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(raw, ensure_ascii=False) + "\n" for _, raw in entries)

        def relabel(msg: str) -> str:  # "<tmp>: record k: ..." -> "<path>: line N: ..."
            m = re.match(re.escape(tmp) + r": record (\d+)", msg)
            return f"{path}: {entries[int(m.group(1))][0]}{msg[m.end():]}" if m else msg.replace(tmp, path)

        try:
            records, rep = read_mmeb(tmp, dataset="sft", skip_bad=cfg.skip_bad, negatives=False,
                                     image_root=os.path.dirname(os.path.abspath(path)))
        except RecordError as e:
            err = RecordError(relabel(str(e)), reason=e.reason)
            err.field, err.file = e.field, e.file
            raise err from None
        for reason, n in rep.counts.items():
            report.skipped[reason] = report.skipped.get(reason, 0) + n
        report.examples += [relabel(x) for x in rep.examples]
    out: dict[int, list[SFTSample]] = {}
    for rec in records:
        k = int(rec.key.rsplit("/", 1)[1])
        where = entries[k][0]
        for side, item in (("query", rec.query), ("positive", rec.positive)):
            tcot = item.get("tcot")
            if not tcot:
                report.no_tcot += 1
                continue
            plain = {key: v for key, v in item.items() if key != "tcot"}
            out.setdefault(k, []).append(
                SFTSample(reasoner_prompt(plain, side, prompts), tcot, f"{path}: {where} ({side})"))
    return out


def load_sft_samples(cfg: SFTDataConfig, files=None) -> tuple[list[SFTSample], SFTDataReport]:
    """Read the SFT files (`files` overrides `cfg.files`) into samples, in file and line order."""
    prompts = load_prompts(cfg.prompts)
    report = SFTDataReport()
    samples: list[SFTSample] = []
    for path in (cfg.files if files is None else files):
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise MissingFileError(f"data file {path}: no such file")
        base = os.path.dirname(os.path.abspath(path))
        mmeb: list[tuple[str, dict]] = []
        plain: list[tuple[int, SFTSample | None]] = []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                report.lines += 1
                where = f"line {lineno}"
                try:
                    try:
                        raw = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise _bad(path, where, f"not valid JSON: {e}", "bad_json") from None
                    if not isinstance(raw, dict):
                        raise _bad(path, where, f"expected a JSON object, got {type(raw).__name__}", "bad_record")
                    if "qry" in raw:
                        mmeb.append((where, raw))
                        plain.append((len(mmeb) - 1, None))
                    elif "prompt" in raw or "completion" in raw:
                        plain.append((-1, _plain_sample(raw, path, where, base)))
                    else:
                        raise _bad(path, where, "neither an SFT sample ('prompt', 'completion') nor an MMEB "
                                   "record ('qry')", "bad_record")
                except RecordError as e:
                    if not cfg.skip_bad:
                        raise
                    report.add(e)
        # keep file order: MMEB records are read together, then put back in their places
        by_entry = _mmeb_samples(path, mmeb, cfg, prompts, report) if mmeb else {}
        for k, s in plain:
            samples.extend(by_entry.get(k, []) if s is None else [s])
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
