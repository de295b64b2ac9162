"""Atomic directory publication: everything is written into a temporary sibling first."""
from __future__ import annotations

import json
import os
import shutil
import threading
import uuid
from pathlib import Path

import jax
from jax.experimental import multihost_utils


def replace_dir(tmp, dest) -> None:
    """Move the finished directory `tmp` to `dest`, replacing an existing `dest`.

    Each step is a rename within one parent directory, so readers see either the old or
    the new directory, never a half-written one.
    """
    tmp, dest = Path(tmp), Path(dest)
    if dest.exists():
        old = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dest)


def write_text_atomic(path, text: str) -> None:
    """Write a small file through a uniquely named temporary sibling and a rename."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_run_config(workdir, config_dict: dict) -> None:
    """WORKDIR/config.json of a run, written by process 0 only (one writer per shared workdir)."""
    if jax.process_index() == 0:
        write_text_atomic(Path(workdir) / "config.json", json.dumps(config_dict, indent=2))


_solo = threading.local()  # inside primary_first's build: what only process 0 runs first


def sync_processes(name: str) -> None:
    """A barrier across the processes of a multi-host run (nothing with one process).

    Refused inside a `primary_first` build, with one process too (so single-process tests catch
    it): process 0 builds alone there, so a barrier pairs with the other processes' wait for the
    build and the run deadlocks (as the toy base did when it was written through `save_hf`).
    """
    if getattr(_solo, "build", None):
        raise RuntimeError(f"barrier {name!r} inside the process-0-only build {_solo.build!r} (primary_first): "
                           "the other processes never reach it; build without collectives (no save_hf, "
                           "save_params, sync_processes or primary_first there)")
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def primary_first(build, name: str):
    """`build()` on process 0 first, then on every other process once process 0 is done.

    Why: in a multi-host run every host runs the same set-up code against one work directory;
    a shared directory is then written by process 0 alone and the others find it ready (with
    per-host directories each host builds its own, deterministic, copy). Process 0 reaches the
    barrier even when its build fails, so the others do not hang; they then fail on their own.
    """
    if jax.process_index() == 0:
        try:
            return _alone(build, name)
        finally:
            sync_processes(name)
    sync_processes(name)
    return _alone(build, name)


def _alone(build, name: str):
    """`build()` with barriers refused (see `sync_processes`)."""
    outer = getattr(_solo, "build", None)
    _solo.build = name
    try:
        return build()
    finally:
        _solo.build = outer
