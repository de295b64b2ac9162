"""Memory-mapped safetensors reading and writing with bfloat16 support.

The `safetensors` package's numpy API has no bfloat16; the format is a JSON header and
raw little-endian buffers, so we map it directly with ml_dtypes. Reading maps the file
and copies only the tensor asked for; writing streams tensors one by one. Object-store files
(gs://..., fsutil) are read through an epath handle, one ranged read per tensor: no local copy.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Iterable, Iterator

import ml_dtypes
import numpy as np
from .errors import MissingFileError
from .fsutil import as_path, is_remote

DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("bool"),
}
NAMES = {v: k for k, v in DTYPES.items()}

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class SafetensorsFile:
    """One .safetensors file: mapped read-only (local) or read by ranges (object store)."""

    def __init__(self, path: str | Path):
        self.remote = is_remote(path)
        self.path = as_path(path) if self.remote else Path(path)
        if not self.path.exists():
            raise MissingFileError(f"safetensors file {path} does not exist")
        with self.path.open("rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        self.metadata = header.pop("__metadata__", {})
        self.header = header
        self.offset = 8 + n
        self._mmap = None
        self._handle = None

    def keys(self):
        return self.header.keys()

    def info(self, key):
        meta = self.header[key]
        return DTYPES[meta["dtype"]], tuple(meta["shape"])

    def get(self, key: str) -> np.ndarray:
        meta = self.header[key]
        dtype = DTYPES.get(meta["dtype"])
        if dtype is None:
            raise ValueError(f"{self.path}: tensor {key} has unsupported dtype {meta['dtype']}")
        start, end = meta["data_offsets"]
        if self.remote:  # one ranged read of this tensor's bytes
            if self._handle is None:
                self._handle = self.path.open("rb")
            self._handle.seek(self.offset + start)
            raw = np.frombuffer(self._handle.read(end - start), dtype=np.uint8)
            if raw.size != end - start:
                raise ValueError(f"{self.path}: tensor {key} is truncated ({raw.size} of {end - start} bytes)")
        else:
            if self._mmap is None:
                self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
            raw = self._mmap[self.offset + start : self.offset + end]
        return raw.view(dtype).reshape(meta["shape"])


class CheckpointReader:
    """All tensors of an HF checkpoint directory (single file or sharded with an index)."""

    def __init__(self, directory: str | Path):
        directory = as_path(directory) if is_remote(directory) else Path(directory)
        if not directory.is_dir():
            raise MissingFileError(f"checkpoint directory {directory} does not exist")
        index = directory / INDEX_NAME
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = {name: SafetensorsFile(directory / name) for name in sorted(set(weight_map.values()))}
            self.where = {k: files[v] for k, v in weight_map.items()}
            for f in files.values():
                missing = set(f.keys()) - set(self.where)
                for k in missing:
                    self.where[k] = f
        elif (directory / SINGLE_NAME).exists():
            f = SafetensorsFile(directory / SINGLE_NAME)
            self.where = {k: f for k in f.keys()}
        else:
            found = sorted(p.name for p in directory.glob("*.safetensors"))
            if not found:
                raise MissingFileError(f"no safetensors weights in {directory}")
            files = [SafetensorsFile(directory / n) for n in found]
            self.where = {k: f for f in files for k in f.keys()}

    def keys(self):
        return self.where.keys()

    def info(self, key):
        return self.where[key].info(key)

    def get(self, key):
        if key not in self.where:
            raise KeyError(f"checkpoint has no tensor {key!r}")
        return self.where[key].get(key)


def _header(tensors: list[tuple[str, np.dtype, tuple[int, ...]]]) -> tuple[bytes, list[int]]:
    header, offset, sizes = {}, 0, []
    for name, dtype, shape in tensors:
        size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header[name] = {"dtype": NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
        sizes.append(size)
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return raw, sizes


def write_file(path: str | Path, items: Iterable[tuple[str, np.ndarray]]) -> None:
    """Write tensors (materialised lazily by the iterable is not possible: header first)."""
    items = list(items)
    raw, _ = _header([(n, np.dtype(a.dtype), a.shape) for n, a in items])
    local = not is_remote(path)
    with (open(path, "wb") if local else as_path(path).open("wb")) as f:  # object stores: through epath
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for _, a in items:
            f.write(np.ascontiguousarray(a).astype(a.dtype.newbyteorder("<"), copy=False).tobytes())
        f.flush()
        if local:
            os.fsync(f.fileno())


def plan_shards(sizes: Iterator[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    shards, cur, cur_bytes = [], [], 0
    for name, size in sizes:
        if cur and cur_bytes + size > max_bytes:
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append(name)
        cur_bytes += size
    if cur:
        shards.append(cur)
    return shards
