"""Joining a multi-host run: which cluster launched this process, and jax.distributed.initialize.

`cluster_kwargs(env, ...)` is a pure function from an environment (a dict) to the keyword
arguments of `jax.distributed.initialize`, so each cluster's detection is tested with its own
variables and nothing is started. Why not jax's own detection alone: under SLURM it gives each
process the one GPU of its local rank, assuming every task sees every GPU of its node, so a task
started with `--gpus-per-task=1` (it sees one GPU, ordinal 0) fails with "invalid device
ordinal", and one task per node trains on one GPU of eight. Here the local devices follow what
the process can actually see:

* one process per GPU (the default of launch/gpu_slurm.sh: `--ntasks-per-node` = GPUs per node,
  `--gpus-per-task=1`): the task sees one GPU, `local_device_ids=[0]`;
* one process per node seeing all its GPUs: `local_device_ids` = every visible GPU;
* several processes sharing the visible GPUs: each takes a contiguous block by local rank.

Sources, first match wins: explicit --coordinator/--num-processes/--process-id; SLURM (srun);
Open MPI (mpirun); otherwise nothing is passed and jax detects the cluster itself (Cloud TPU
pods, Kubernetes). `JAX_COORDINATOR_ADDRESS`, `JAX_COORDINATOR_PORT` and `JAX_LOCAL_DEVICE_IDS`
override what is detected.
"""
from __future__ import annotations

import os
import re
import socket
import sys
import time
from typing import Any, Mapping, NamedTuple

import jax

from .errors import UserError


class CoordinatorUnreachable(UserError, ConnectionError):
    """The coordinator could not be reached in time; the message names its address."""


INIT_TIMEOUT_S = 300  # jax's default; EMBEDRL_INIT_TIMEOUT overrides it


class Cluster(NamedTuple):
    name: str  # "explicit", "slurm", "openmpi" or "auto" (left to jax)
    kwargs: dict[str, Any]  # for jax.distributed.initialize


def cluster_kwargs(env: Mapping[str, str], coordinator: str | None = None, num_processes: int | None = None,
                   process_id: int | None = None) -> Cluster:
    """How this process joins the run, from its environment and the explicit flags."""
    given = [v is not None for v in (coordinator, num_processes, process_id)]
    if any(given) and not all(given):
        raise UserError("--coordinator, --num-processes and --process-id go together")
    if all(given):
        if not 0 <= process_id < num_processes:
            raise UserError(f"--process-id {process_id} is outside 0..{num_processes - 1} "
                             f"(--num-processes {num_processes})")
        kwargs = dict(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
        ids = _explicit_ids(env)
        return Cluster("explicit", kwargs if ids is None else dict(kwargs, local_device_ids=ids))
    if all(k in env for k in ("SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")):
        return Cluster("slurm", _slurm(env))
    if "OMPI_COMM_WORLD_SIZE" in env and "OMPI_COMM_WORLD_RANK" in env:
        return Cluster("openmpi", _openmpi(env))
    return Cluster("auto", {})


def _slurm(env: Mapping[str, str]) -> dict[str, Any]:
    nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
    if not nodes:
        raise UserError("SLURM: neither SLURM_STEP_NODELIST nor SLURM_JOB_NODELIST is set (start the tasks with srun)")
    # a port every task derives alike from the job id, in the ephemeral range
    port = env.get("JAX_COORDINATOR_PORT") or str(60000 + int(env["SLURM_JOB_ID"]) % 5000)
    address = env.get("JAX_COORDINATOR_ADDRESS") or f"{first_host(nodes)}:{port}"
    per_node = _tasks_on_node(env)
    kwargs = dict(coordinator_address=address, num_processes=int(env["SLURM_NTASKS"]),
                  process_id=int(env["SLURM_PROCID"]))
    ids = local_device_ids(env, int(env["SLURM_LOCALID"]), per_node)
    return kwargs if ids is None else dict(kwargs, local_device_ids=ids)


def _openmpi(env: Mapping[str, str]) -> dict[str, Any]:
    address = env.get("JAX_COORDINATOR_ADDRESS")
    if not address:
        # Open MPI 4 publishes the launcher's address; Open MPI 5 (PMIx) does not
        uri = env.get("OMPI_MCA_orte_hnp_uri", "")
        match = re.search(r"tcp://([^,:/]+)", uri)
        if not match:
            raise UserError("Open MPI: cannot tell the coordinator's address from the environment; pass "
                             "-x JAX_COORDINATOR_ADDRESS=HOST:PORT to mpirun (HOST = the first host of the run)")
        port = env.get("JAX_COORDINATOR_PORT") or str(60000 + int(uri.split(".", 1)[0]) // 4096 % 5000)
        address = f"{match.group(1)}:{port}"
    kwargs = dict(coordinator_address=address, num_processes=int(env["OMPI_COMM_WORLD_SIZE"]),
                  process_id=int(env["OMPI_COMM_WORLD_RANK"]))
    ids = local_device_ids(env, int(env.get("OMPI_COMM_WORLD_LOCAL_RANK", 0)),
                           int(env.get("OMPI_COMM_WORLD_LOCAL_SIZE", 1)))
    return kwargs if ids is None else dict(kwargs, local_device_ids=ids)


def first_host(nodelist: str) -> str:
    """The first host of a SLURM host list: 'gpu[003-004,010],cpu1' -> 'gpu003'."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not match:
        raise UserError(f"SLURM node list {nodelist!r} is empty or malformed")
    prefix, ranges = match.groups()
    return prefix + (re.split(r"[,-]", ranges)[0] if ranges else "")


def _tasks_on_node(env: Mapping[str, str]) -> int:
    """Tasks on this node: SLURM_NTASKS_PER_NODE, else this node's entry of SLURM_STEP_TASKS_PER_NODE
    (or SLURM_TASKS_PER_NODE), written like '4(x2),3'."""
    if env.get("SLURM_NTASKS_PER_NODE"):
        return int(env["SLURM_NTASKS_PER_NODE"])
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if not spec:
        return 1
    counts = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            raise UserError(f"SLURM tasks per node {spec!r} is malformed")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    node = int(env.get("SLURM_NODEID", 0))
    return counts[node] if node < len(counts) else counts[-1]


def _explicit_ids(env: Mapping[str, str]) -> list[int] | None:
    ids = env.get("JAX_LOCAL_DEVICE_IDS")
    if ids is None or not ids.strip():
        return None
    try:
        return [int(i) for i in ids.split(",")]
    except ValueError:
        raise UserError(f"JAX_LOCAL_DEVICE_IDS={ids!r} must be comma-separated device ordinals") from None


def local_device_ids(env: Mapping[str, str], local_rank: int, local_size: int) -> list[int] | None:
    """The GPU ordinals (as this process sees them) it drives, or None where no GPUs are known
    (TPU and CPU hosts: jax takes every local device)."""
    explicit = _explicit_ids(env)
    if explicit is not None:
        return explicit
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() and visible.strip() != "NoDevFiles":
        n = len([v for v in visible.split(",") if v.strip()])
    elif env.get("SLURM_GPUS_ON_NODE"):
        n = int(env["SLURM_GPUS_ON_NODE"])
    else:
        return None
    if local_size <= 1:
        return list(range(n))  # one process per node: all its GPUs
    if n == 1:
        return [0]  # bound per task (--gpus-per-task=1): the one GPU it sees
    if n % local_size:
        raise UserError(f"{n} visible GPUs do not split evenly over the {local_size} processes of this node; "
                         "bind one GPU per task (--gpus-per-task=1) or set JAX_LOCAL_DEVICE_IDS")
    per = n // local_size
    return list(range(local_rank * per, (local_rank + 1) * per))


def wait_for_coordinator(address: str, timeout: float) -> None:
    """Block until `address` (HOST:PORT) accepts TCP connections; ConnectionError naming it after `timeout` s."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"coordinator address {address!r} must be HOST:PORT")
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=min(2.0, timeout)):
                return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise CoordinatorUnreachable(f"coordinator {address} not reachable within {timeout} s (EMBEDRL_INIT_TIMEOUT): "
                                      f"{e}; is process 0 running, and is the port open between the hosts?") from None
            time.sleep(0.5)


def initialize(args, env: Mapping[str, str] | None = None) -> Cluster:
    """jax.distributed.initialize for this process, before anything touches a backend.

    `args` carries `coordinator`, `num_processes`, `process_id` (None where not given). An
    unreachable coordinator fails after EMBEDRL_INIT_TIMEOUT seconds (default 300) with its
    address in the message. On CPU the processes need a cross-process collectives library
    (gloo), or any computation spanning hosts fails; accelerators bring their own.
    """
    env = os.environ if env is None else env
    cluster = cluster_kwargs(env, getattr(args, "coordinator", None), getattr(args, "num_processes", None),
                             getattr(args, "process_id", None))
    timeout = int(env.get("EMBEDRL_INIT_TIMEOUT", INIT_TIMEOUT_S))
    if env.get("JAX_PLATFORMS", "").split(",")[0] == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    address = cluster.kwargs.get("coordinator_address")
    if address and cluster.kwargs.get("process_id"):
        # jax's client aborts the whole process (no Python error) when registration times out,
        # so the other processes first wait here, where the failure can name the address
        wait_for_coordinator(address, timeout)
    try:
        jax.distributed.initialize(**cluster.kwargs, initialization_timeout=timeout)
    except Exception as e:  # noqa: BLE001 - jax raises its runtime error types here; name the address
        where = cluster.kwargs.get("coordinator_address", "the coordinator jax detected")
        first = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
        raise CoordinatorUnreachable(f"could not join the run ({cluster.name}) through coordinator {where} within {timeout} s "
                              f"(EMBEDRL_INIT_TIMEOUT): {first}") from e
    print(f"embedrl: process {jax.process_index()} of {jax.process_count()}, {jax.device_count()} devices in all "
          f"({cluster.name})", file=sys.stderr, flush=True)
    return cluster
