"""The path layer: local paths and object-store URLs (gs://, s3://, ... through etils.epath, the
library orbax uses) behind one `as_path`, and atomic publication of files and directories.

Local directories are published by rename (atomic). Object stores have no atomic directory
rename, so a published directory there is complete only when its commit marker
(`COMMIT_MARKER`) exists: the old copy loses its marker first, the new files are copied in, the
marker is written last; `is_published` is what readers check.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import uuid
from pathlib import Path

import jax
from etils import epath
from jax.experimental import multihost_utils

from .errors import UserError

COMMIT_MARKER = "commit_success.txt"  # the name orbax uses for the same purpose


def is_remote(path) -> bool:
    """An object-store URL (scheme://...), as opposed to a local path."""
    return "://" in os.fspath(path)


def as_path(path, *, absolute: bool = False) -> epath.Path:
    """`path` (str, pathlib.Path or URL) as an epath.Path; local ones made absolute on request.
    An object-store URL whose filesystem package is missing raises a UserError naming it."""
    p = epath.Path(path)
    if is_remote(p):
        try:
            p.exists()
        except ImportError as e:
            raise UserError(f"{os.fspath(path)}: {e} (the object store's filesystem package is not installed)") from None
        return p
    return epath.Path(os.path.abspath(os.fspath(p))) if absolute else p


def is_published(directory) -> bool:
    """A directory published by `replace_dir` is complete (locally: it exists; object store:
    its commit marker exists)."""
    d = as_path(directory)
    return (d / COMMIT_MARKER).exists() if is_remote(d) else d.is_dir()


def _copy_tree(src: epath.Path, dst: epath.Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for child in src.iterdir():
        if child.is_dir():
            _copy_tree(child, dst / child.name)
        else:
            child.copy(dst / child.name, overwrite=True)


def replace_dir(tmp, dest) -> None:
    """Move the finished directory `tmp` to `dest`, replacing an existing `dest`.

    Locally each step is a rename within one parent directory, so readers see either the old
    or the new directory, never a half-written one. On an object store (no atomic rename) the
    commit marker decides: see the module docstring.
    """
    if is_remote(tmp) or is_remote(dest):
        tmp, dest = as_path(tmp), as_path(dest)
        (dest / COMMIT_MARKER).unlink(missing_ok=True)  # from here on readers see no complete copy
        if dest.exists():
            dest.rmtree()
        _copy_tree(tmp, dest)
        (dest / COMMIT_MARKER).write_text("published\n")
        tmp.rmtree()
        return
    tmp, dest = Path(tmp), Path(dest)
    if dest.exists():
        old = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dest)


def write_text_atomic(path, text: str) -> None:
    """Write a small file through a uniquely named temporary sibling and a rename (an object
    store writes each object whole: one write)."""
    if is_remote(path):
        as_path(path).write_text(text)
        return
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
        write_text_atomic(as_path(workdir) / "config.json", json.dumps(config_dict, indent=2))


def local_staging(directory):
    """(local directory to write into, finish()) for writers that only know local files (e.g.
    transformers' save_pretrained): for a local `directory` itself; for an object store a
    local temporary directory whose files finish() uploads."""
    if not is_remote(directory):
        return Path(directory), lambda: None
    local = Path(tempfile.mkdtemp(prefix="embedrl-stage-"))

    def finish():
        _copy_tree(epath.Path(local), as_path(directory))
        shutil.rmtree(local, ignore_errors=True)

    return local, finish


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
