"""Atomic directory publication: everything is written into a temporary sibling first."""
from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path


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
