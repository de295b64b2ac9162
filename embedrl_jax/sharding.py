"""One device mesh, one rules table from logical axis names to mesh axes.

Models annotate parameters and a few activations with *logical* names only. Everything
that turns names into placements lives here, so the model never learns what a mesh is.
A rule whose mesh axes do not divide a dimension falls back to replicating that
dimension (tiny test configs and odd batch sizes hit this), and a mesh axis is never
used twice in one spec.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import zlib
from typing import Any, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from .errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axis (or tuple of axes, or None = replicated)
RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("seq", None),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("vision_embed", "fsdp"),
    ("vision_heads", "tensor"),
    ("vision_mlp", "tensor"),
    ("patch", None),
    ("positions", None),
    ("layers", None),
    ("lora", None),
    ("norm", None),
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh shape; -1 on one axis takes the remaining devices.

    With `slices` > 1 (TPU multi-slice, or GPU hosts joined by a slower network) `data`, `fsdp`
    and `tensor` describe one slice and the data axis is repeated over the slices: data
    parallelism crosses the data-centre network (one gradient all-reduce per step), while FSDP's
    all-gathers and tensor parallelism stay on a slice's fast interconnect.
    """

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    slices: int = 1

    @classmethod
    def parse(cls, text: str) -> "MeshConfig":
        """`--mesh D,F,T` (one slice's data, fsdp, tensor sizes) as given on a command line."""
        try:
            dims = [int(x) for x in text.split(",")]
        except ValueError:
            dims = []
        if len(dims) != 3:
            raise UserError(f"--mesh {text!r}: expected three comma-separated sizes data,fsdp,tensor (e.g. 1,-1,1)")
        return cls(*dims)

    def slice_shape(self, n_devices: int) -> tuple[int, int, int]:
        """(data, fsdp, tensor) inside one slice of `n_devices / slices` devices."""
        if self.slices < 1:
            raise ValueError(f"mesh.slices must be >= 1, got {self.slices}")
        if n_devices % self.slices:
            raise ValueError(f"mesh.slices={self.slices} does not divide the {n_devices} devices")
        n = n_devices // self.slices
        dims = [self.data, self.fsdp, self.tensor]
        if dims.count(-1) > 1:
            raise ValueError(f"at most one mesh axis may be -1, got {dims}")
        known = math.prod(d for d in dims if d != -1)
        where = f" per slice ({self.slices} slices)" if self.slices > 1 else ""
        if -1 in dims:
            if n % known:
                raise ValueError(f"{n} devices{where} do not divide into mesh {dims}")
            dims[dims.index(-1)] = n // known
        if math.prod(dims) != n:
            raise ValueError(f"mesh {dict(zip(MESH_AXES, dims))} needs {math.prod(dims)} devices{where}, have {n}")
        return tuple(dims)

    def shape(self, n_devices: int) -> tuple[int, int, int]:
        """The whole mesh: the data axis spans the slices."""
        data, fsdp, tensor = self.slice_shape(n_devices)
        return data * self.slices, fsdp, tensor


def device_slices(devices: Sequence[jax.Device]) -> dict[int, int]:
    """{slice: device count}: TPU slices by `slice_index`; devices without one (GPUs, CPUs, a
    single TPU slice) form one slice per process when they span several, else one slice."""
    ids = [getattr(d, "slice_index", None) for d in devices]
    if any(i is not None for i in ids):
        keys = [int(i or 0) for i in ids]
    else:
        several = len({d.process_index for d in devices}) > 1
        keys = [int(d.process_index) if several else 0 for d in devices]
    return {k: keys.count(k) for k in sorted(set(keys))}


def make_mesh(config: MeshConfig | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The only place a mesh is built: axes (data, fsdp, tensor), all Auto (GSPMD).

    `devices` (default: all) may be compile-only devices of a TPU topology. With slices > 1 the
    mesh is `mesh_utils.create_hybrid_device_mesh`'s: one (data, fsdp, tensor) mesh per slice in
    the slice's own interconnect order, the slices stacked along data.
    """
    config = config or MeshConfig()
    devices = list(devices) if devices is not None else jax.devices()
    per_slice = config.slice_shape(len(devices))
    if config.slices == 1:
        tpu_slices = {getattr(d, "slice_index", None) for d in devices} - {None}
        if len(tpu_slices) > 1:
            raise ValueError(f"the {len(devices)} devices form {len(tpu_slices)} TPU slices but mesh.slices=1; "
                             f"set mesh.slices={len(tpu_slices)}")
        return jax.make_mesh(per_slice, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)
    found = device_slices(devices)
    by_process = not any(getattr(d, "slice_index", None) is not None for d in devices)
    if len(found) != config.slices:
        raise ValueError(f"mesh.slices={config.slices} but the {len(devices)} devices form {len(found)} slice(s) "
                         f"({'one per process' if by_process else 'by slice_index'})")
    grid = mesh_utils.create_hybrid_device_mesh(per_slice, (config.slices, 1, 1), devices,
                                                process_is_granule=by_process)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def _axis_size(mesh, axes) -> int:
    if axes is None:
        return 1
    if isinstance(axes, str):
        axes = (axes,)
    return math.prod(mesh.shape[a] for a in axes)


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], mesh, rules=RULES) -> P:
    """Resolve logical names for one array; undivisible or reused mesh axes replicate."""
    table = dict(rules)
    if len(names) != len(shape):
        raise ValueError(f"logical names {tuple(names)} do not match rank of shape {tuple(shape)}")
    used: set[str] = set()
    spec = []
    for name, dim in zip(names, shape):
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            raise KeyError(f"logical axis {name!r} has no sharding rule")
        axes = table[name]
        if axes is None:
            spec.append(None)
            continue
        axes_t = (axes,) if isinstance(axes, str) else tuple(axes)
        # drop axes already used or of size 1; then require divisibility
        axes_t = tuple(a for a in axes_t if a not in used and mesh.shape[a] > 1)
        if not axes_t or dim % _axis_size(mesh, axes_t):
            spec.append(None)
            continue
        used.update(axes_t)
        spec.append(axes_t[0] if len(axes_t) == 1 else axes_t)
    return P(*spec)


def named_sharding(names, shape, mesh, rules=RULES) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(names, shape, mesh, rules))


def tree_shardings(axes_tree, shapes_tree, mesh, rules=RULES):
    """Shardings for a parameter pytree from a parallel pytree of logical-name tuples."""
    return jax.tree.map(
        lambda names, leaf: named_sharding(names, np.shape(leaf) if not hasattr(leaf, "shape") else leaf.shape, mesh, rules),
        axes_tree,
        shapes_tree,
        is_leaf=lambda x: isinstance(x, tuple) and all(isinstance(n, (str, type(None))) for n in x),
    )


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def constrain(x: jax.Array, names: Sequence[str | None], rules=RULES) -> jax.Array:
    """Activation sharding hint under the mesh set by `jax.set_mesh`.

    Single-device runs (no mesh in context) have nothing to constrain; under any mesh,
    CPU included, the constraint is applied.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names, x.shape, mesh, rules))


def to_host(x) -> np.ndarray:
    """The whole value of a jax.Array as numpy on this host, gathering the other hosts' shards
    when it spans several processes (then a collective: every process calls it, in order)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))


def _batch_devices(mesh) -> int:
    return _axis_size(mesh, dict(RULES)["batch"])


def mesh_processes(mesh) -> list[int]:
    """The processes whose devices make up the mesh, in order."""
    return sorted({int(d.process_index) for d in np.asarray(mesh.devices).flat})


def batch_split_per_host(mesh) -> int:
    """Into how many pieces the batch axes split each data shard's rows (at least 1): a shard's
    row count must be a multiple of it for the global batch to divide over the batch devices."""
    size, n = _batch_devices(mesh), len(set(_data_shards(mesh).values()))
    return max(1, size // math.gcd(size, n))


def _row_owners(sharding: NamedSharding, shape: Sequence[int], axis: int) -> dict[int, np.ndarray]:
    """{process: the global rows along `axis` its devices hold, ascending} (a row may be held by several)."""
    n_rows = int(shape[axis])
    held: dict[int, np.ndarray] = {p: np.zeros(n_rows, bool) for p in mesh_processes(sharding.mesh)}
    for device, index in sharding.devices_indices_map(tuple(shape)).items():
        held[int(device.process_index)][index[axis]] = True
    return {p: np.flatnonzero(h) for p, h in held.items()}


def rows_by_process(sharding: NamedSharding, shape: Sequence[int], axis: int = 0) -> dict[int, np.ndarray]:
    """Which global rows along `axis` each process fills: {process index: its rows, ascending}.

    Host-side and pure: it reads only where the sharding puts each device's index and which
    process owns the device, so it holds for any device order (TPU torus order, several slices,
    GPUs) and can be checked against compile-only topologies without running the processes. A
    process's local rows are its global rows in ascending order.

    A row may sit on devices of several processes: `jax.make_mesh` lays `tensor=4` across two
    hosts of a v5p or v5e slice, and no host order keeps `tensor=8` inside a 4-chip host. Those
    processes then form one data shard (`data_shard`): they hold the same rows and load the same
    samples. Raises a ValueError when two processes' rows overlap without being equal (no split
    of the samples gives both identical data) or the shards differ in size.
    """
    owners = _row_owners(sharding, shape, axis)
    shards: dict[tuple[int, ...], list[int]] = {}
    for p, rows in owners.items():
        shards.setdefault(tuple(rows.tolist()), []).append(p)
    seen = np.full(int(shape[axis]), -1, np.int64)
    for rows, procs in shards.items():
        clash = seen[list(rows)]
        clash = clash[clash >= 0]
        if clash.size:
            other = int(clash[0])
            raise ValueError(f"processes {other} and {procs[0]} share some rows of {shape[axis]} but not all "
                             f"({owners[other].tolist()} vs {list(rows)}) under {sharding.spec}: no split of the "
                             "samples gives both identical data there; use a mesh whose batch-replicating axes "
                             "(tensor) cover whole hosts or stay inside one")
        seen[list(rows)] = procs[0]
    sizes = {procs[0]: len(rows) for rows, procs in shards.items()}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"data shards hold unequal shares of {shape[axis]} rows ({sizes}, by first process) "
                         f"under {sharding.spec}")
    return owners


def batch_rows(mesh, rows: int) -> dict[int, np.ndarray]:
    """`rows_by_process` for a batch dim of `rows` global rows sharded by the "batch" rule: the
    rows every batch-major array (samples, patch rows) gives each process."""
    return rows_by_process(NamedSharding(mesh, logical_to_spec(("batch",), (rows,), mesh)), (rows,))


def _data_shards(mesh) -> dict[int, int]:
    """{process: its data shard}: processes holding the same batch rows share one, numbered by
    their lowest process index."""
    owners = batch_rows(mesh, max(1, _batch_devices(mesh)))  # one row per batch position
    index: dict[tuple[int, ...], int] = {}
    return {p: index.setdefault(tuple(rows.tolist()), len(index)) for p, rows in sorted(owners.items())}


def data_shard(mesh, process_index: int | None = None) -> tuple[int, int]:
    """(shard index, shard count) of a process's data: which share of a step's samples it loads.

    The trainers split each step's samples into `count` equal contiguous shares and give share
    `index` to the process -- use this, not (process_index, process_count). The processes whose
    devices hold the same batch rows (a tensor axis laid across hosts) form one shard and load
    identical samples, since each must fill those rows with the same data; when every process
    holds rows of its own this is (process_index, process_count) up to order. Shards are
    numbered by their lowest process index. Pure given `process_index` (default: this process).
    """
    p = jax.process_index() if process_index is None else int(process_index)
    shards = _data_shards(mesh)
    if p not in shards:
        raise ValueError(f"process {p} owns no device of this mesh (its processes: {sorted(shards)})")
    return shards[p], len(set(shards.values()))


def hosts_max(values: Sequence[int]) -> tuple[int, ...]:
    """Elementwise max of a small int vector over all processes (a collective; one process: itself)."""
    if jax.process_count() == 1:
        return tuple(int(v) for v in values)
    from jax.experimental import multihost_utils

    every = np.asarray(multihost_utils.process_allgather(np.asarray(values, np.int32)))
    return tuple(int(v) for v in every.reshape(jax.process_count(), -1).max(axis=0))


def global_batch(mesh, arrays: dict[str, np.ndarray], axes: dict[str, Sequence[str | None]]) -> dict[str, jax.Array]:
    """Each process's own rows -> global arrays: a process's rows fill, in ascending order, the
    global rows the mesh assigns to its devices (`batch_rows`), whatever the device order; the
    global "batch" dim is the data shards' row counts summed (`data_shard`: processes whose
    devices hold the same rows form one shard and must pass identical rows), sharded by the
    rules table.

    `axes[k]` holds the logical names of `arrays[k]` with exactly one "batch". With several
    shards the batch dim must be sharded across them: were it replicated, each shard's
    different rows would be taken for one replicated value (silently wrong data), so that
    raises a ValueError naming the array. One shard may replicate an indivisible batch.
    Indices into another array's rows (the visual index into patch rows) must follow the same
    assignment: `inputs.host_share` moves them there.
    """
    p = jax.process_index()
    n = data_shard(mesh, p)[1]
    _check_shard_data(mesh, arrays)
    out = {}
    for k, v in arrays.items():
        names = tuple(axes[k])
        b = names.index("batch")
        shape = list(v.shape)
        shape[b] *= n
        spec = logical_to_spec(names, shape, mesh)
        if n > 1 and spec[b] is None:
            size = _batch_devices(mesh)
            raise ValueError(f"{k}: a global batch of {shape[b]} rows ({n} data shards x {v.shape[b]}) cannot be split "
                             f"over the mesh's batch axes ({size} devices); make it a multiple of {size}")
        if spec[b] != logical_to_spec(("batch",), (shape[b],), mesh)[0]:
            raise ValueError(f"{k}: its batch dim is sharded over {spec[b]}, not as the batch rule gives it; "
                             "indices between batch-major arrays would not line up")
        sharding = NamedSharding(mesh, spec)
        rows = rows_by_process(sharding, shape, b)[p]
        if len(rows) != v.shape[b]:
            raise ValueError(f"{k}: process {p} fills {len(rows)} of the {shape[b]} global rows but has {v.shape[b]}")
        fill = functools.partial(_local_rows, v, rows, b, shape[b])
        out[k] = jax.make_array_from_callback(tuple(shape), sharding, fill)
    return out


def _check_shard_data(mesh, arrays: dict[str, np.ndarray]) -> None:
    """Processes of one data shard fill the same rows, so they must pass the same data; a trainer
    that splits samples by process index instead of `data_shard` would give the replicas of a
    row different samples (silently). Compares a strided fingerprint of every array (one small
    all-gather, only when some shard has several processes)."""
    shards = _data_shards(mesh)
    if len(set(shards.values())) == len(shards):
        return
    from jax.experimental import multihost_utils

    keys = sorted(arrays)
    mine = []
    for k in keys:
        flat = np.ascontiguousarray(arrays[k]).reshape(-1)
        mine.append(zlib.crc32(np.ascontiguousarray(flat[::max(1, flat.size // 65536)]).tobytes()) & 0x7FFFFFFF)
    every = np.asarray(multihost_utils.process_allgather(np.asarray(mine, np.int32))).reshape(jax.process_count(), -1)
    first: dict[int, int] = {}
    for q, i in sorted(shards.items()):
        lead = first.setdefault(i, q)
        bad = [k for k, a, b in zip(keys, every[lead], every[q]) if a != b]
        if bad:
            raise ValueError(f"processes {lead} and {q} hold the same batch rows (data shard {i}) but passed different "
                             f"{bad}: each process must load the share sharding.data_shard(mesh) gives it, "
                             "not its process_index's")


def _local_rows(local: np.ndarray, rows: np.ndarray, axis: int, n_global: int, index: tuple) -> np.ndarray:
    """A device's block of a global array from this process's rows (`rows`: their global rows)."""
    start, stop, _ = index[axis].indices(n_global)
    lo = int(np.searchsorted(rows, start))
    index = list(index)
    index[axis] = slice(lo, lo + (stop - start))
    return local[tuple(index)]
