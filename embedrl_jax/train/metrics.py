"""Per-step metrics as JSON lines (WORKDIR/metrics.jsonl), safe across restarts."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np


def _plain(v):
    if isinstance(v, (np.generic, np.ndarray)):
        return v.item() if np.ndim(v) == 0 else np.asarray(v).tolist()
    if hasattr(v, "item") and getattr(v, "ndim", 1) == 0:
        return v.item()
    return v


class MetricsWriter:
    """Appends one JSON object per step; on resume drops rows past the restored step, so a
    crash between a metrics write and the next checkpoint never leaves duplicate steps."""

    def __init__(self, path, *, resume_step: int | None = None, enabled: bool = True):
        self.enabled = enabled  # one writer per run: only process 0 of a multi-host job
        self.path = Path(path)
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            keep = []
            for line in self.path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a torn last line from a crash
                if resume_step is not None and row.get("step", 0) <= resume_step:
                    keep.append(line)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(k + "\n" for k in keep))
            os.replace(tmp, self.path)
        self._f = open(self.path, "a")

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        self._f.write(json.dumps({k: _plain(v) for k, v in row.items()}) + "\n")
        self._f.flush()

    def close(self):
        if self.enabled:
            self._f.close()


def read_metrics(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
