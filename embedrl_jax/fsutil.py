"""The path layer: local paths and object-store URLs (gs://, s3://, ... through etils.epath, the
library orbax uses) behind one `as_path`, and atomic publication of files and directories.

Local directories are published by rename (atomic). Object stores have no atomic directory
rename, so a published directory there is complete only when its commit marker
(`COMMIT_MARKER`) exists: the old copy loses its marker first, the new files are copied in, the
marker is written last; `is_published` is what readers check. The marker holds a unique id per
publication, so a local copy of a published directory (`local_copy`) knows when it is stale.

Writers build in a local directory (`staged_dir`) and publish it; readers that need local files
(transformers' tokenizer and processor, PIL, the record readers) read through `local_copy`; the
safetensors reader streams object-store files through `epath` (`safetensors_io`).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import threading
import uuid
from pathlib import Path

import jax
from etils import epath
import orbax.checkpoint as ocp

from .errors import MissingFileError, UserError

COMMIT_MARKER = "commit_success.txt"  # the name orbax uses for the same purpose
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5", ".ckpt")


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


def _copy_tree(src: epath.Path, dst: epath.Path, *, skip=(COMMIT_MARKER,)) -> None:
    """Copy `src` into `dst` file by file; names in `skip` (the commit marker: the publisher
    writes it last itself) are left out at every level."""
    dst.mkdir(parents=True, exist_ok=True)
    for child in src.iterdir():
        if child.name in skip:
            continue
        if child.is_dir():
            _copy_tree(child, dst / child.name, skip=skip)
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
        _copy_tree(tmp, dest)  # the marker of `tmp`, if any, is not copied: it goes last
        (dest / COMMIT_MARKER).write_text(f"published {uuid.uuid4().hex}\n")
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


@contextlib.contextmanager
def staged_dir(dest):
    """Build a directory for `dest` and publish it as a whole: yields an empty local directory
    (locally a hidden sibling of `dest`, so the publication is a rename; for an object store a
    local temporary directory, uploaded with the commit marker last); on success it replaces
    `dest` (`replace_dir`), on failure it is removed and `dest` is untouched."""
    if is_remote(dest):
        tmp = Path(tempfile.mkdtemp(prefix="embedrl-stage-"))
    else:
        dest = Path(os.path.abspath(os.fspath(dest)))
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    os.chmod(tmp, 0o755)  # mkdtemp's 0700 would survive the rename
    try:
        yield tmp
        replace_dir(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def require(path, what: str) -> epath.Path:
    """`path` as an epath.Path; a MissingFileError naming `what` and the path when it does not
    exist (an object store's "no such object" reads the same as a missing local file)."""
    p = as_path(path)
    if not p.exists():
        raise MissingFileError(f"{what}: {os.fspath(path)} does not exist")
    return p


def cache_root() -> Path:
    """Where local copies of object-store directories live: $EMBEDRL_CACHE, else
    ~/.cache/embedrl_jax."""
    return Path(os.environ.get("EMBEDRL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "embedrl_jax"))


def local_copy(directory, *, side_files_only: bool = False) -> Path:
    """A local directory with the files of `directory`, for readers that take local paths only.

    A local `directory` is returned as it is. For an object-store URL the files are copied into
    a directory under `cache_root()` (built aside and renamed into place). With `side_files_only`
    only the top-level files that are not weights (`WEIGHT_SUFFIXES`) are copied -- a model
    directory's config, tokenizer and processor files; the weights are streamed, not copied --
    and a directory without a commit marker is fine. Otherwise the whole tree is copied and the
    directory must be published (its commit marker present); the copy is reused while its marker
    equals the object store's (every publication writes a new one). Each process keeps its own copy.
    """
    if not is_remote(directory):
        return Path(directory)
    src = as_path(directory)
    if not src.is_dir():
        raise MissingFileError(f"{os.fspath(directory)} does not exist")
    marker = src / COMMIT_MARKER
    stamp = marker.read_text() if marker.exists() else None
    if not side_files_only and stamp is None:
        raise MissingFileError(f"{os.fspath(directory)} is not published (no {COMMIT_MARKER}): an interrupted upload "
                               "or not written by embedrl_jax")
    key = hashlib.sha1(f"{os.fspath(src)}|{side_files_only}".encode()).hexdigest()[:16]
    # one copy per process: processes sharing a host (one per GPU) never replace each other's copy mid-read
    dest = cache_root() / "remote" / f"{key}-p{jax.process_index()}-{src.name}"
    if stamp is not None and (dest / COMMIT_MARKER).is_file() and (dest / COMMIT_MARKER).read_text() == stamp:
        return dest
    with staged_dir(dest) as tmp:
        if side_files_only:
            for child in src.iterdir():
                if not child.name.endswith(WEIGHT_SUFFIXES) and not child.is_dir():
                    child.copy(epath.Path(tmp) / child.name, overwrite=True)
        else:
            _copy_tree(src, epath.Path(tmp))
        if stamp is not None:
            (tmp / COMMIT_MARKER).write_text(stamp)
    return dest


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
        # The coordination service's barrier, not a device collective: `sync_global_devices`
        # sets up CPU collectives (gloo) whose connect times out after 30 s, so a process that
        # reached the barrier while process 0 was still building (a toy base, a data set) failed.
        count = _barrier_counts[name] = _barrier_counts.get(name, 0) + 1
        ocp.multihost.get_barrier_sync_fn()(key=f"{name}#{count}", timeout_ms=int(barrier_timeout_s() * 1000))


_barrier_counts: dict[str, int] = {}  # every process calls the same barriers in order; keys must be unique


def barrier_timeout_s() -> float:
    """How long a process waits at a barrier for the others: $EMBEDRL_BARRIER_TIMEOUT seconds,
    default one hour (process 0 may be building a data set or a toy base meanwhile)."""
    raw = os.environ.get("EMBEDRL_BARRIER_TIMEOUT", "3600")
    try:
        value = float(raw)
    except ValueError:
        raise UserError(f"EMBEDRL_BARRIER_TIMEOUT: {raw!r} is not a number of seconds") from None
    if value <= 0:
        raise UserError(f"EMBEDRL_BARRIER_TIMEOUT must be > 0 seconds, got {raw!r}")
    return value


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
