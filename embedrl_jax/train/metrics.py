"""Per-step metrics as JSON lines (WORKDIR/metrics.jsonl), safe across restarts; the path may be
an object-store URL (objects cannot be appended to: the file is rewritten whole, at most every
`remote_flush_s` seconds and at close)."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from ..fsutil import as_path, is_remote, write_text_atomic


def _plain(v):
    if isinstance(v, (np.generic, np.ndarray)):
        return v.item() if np.ndim(v) == 0 else np.asarray(v).tolist()
    if hasattr(v, "item") and getattr(v, "ndim", 1) == 0:
        return v.item()
    return v


class MetricsWriter:
    """Appends one JSON object per step; on resume drops rows past the restored step, so a
    crash between a metrics write and the next checkpoint never leaves duplicate steps."""

    def __init__(self, path, *, resume_step: int | None = None, enabled: bool = True, remote_flush_s: float = 30.0):
        self.enabled = enabled  # one writer per run: only process 0 of a multi-host job
        self.remote = is_remote(path)
        self.path = as_path(path) if self.remote else Path(path)
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.remote:
            self._lines = [line for line in (self.path.read_text().splitlines() if self.path.exists() else [])
                           if _kept(line, resume_step)]
            self._flush_s, self._flushed = remote_flush_s, time.monotonic()
            return
        if self.path.exists():
            keep = [line for line in self.path.read_text().splitlines() if _kept(line, resume_step)]
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(k + "\n" for k in keep))
            os.replace(tmp, self.path)
        self._f = open(self.path, "a")

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        line = json.dumps({k: _plain(v) for k, v in row.items()})
        if self.remote:
            self._lines.append(line)
            if time.monotonic() - self._flushed >= self._flush_s:
                self.flush()
            return
        self._f.write(line + "\n")
        self._f.flush()

    def flush(self):
        if self.enabled and self.remote:
            write_text_atomic(self.path, "".join(k + "\n" for k in self._lines))
            self._flushed = time.monotonic()

    def close(self):
        if not self.enabled:
            return
        if self.remote:
            self.flush()
        else:
            self._f.close()


def _kept(line: str, resume_step: int | None) -> bool:
    """A row kept on resume: parseable (a torn last line from a crash is not) and not past the
    restored step."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return False
    return resume_step is not None and row.get("step", 0) <= resume_step


def read_metrics(path) -> list[dict]:
    return [json.loads(line) for line in as_path(path).read_text().splitlines() if line.strip()]
