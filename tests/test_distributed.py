"""Joining a multi-host run: each cluster's environment -> jax.distributed.initialize arguments."""
import os
import subprocess
import sys

import jax
import orbax.checkpoint as ocp
import pytest

from embedrl_jax import fsutil
from embedrl_jax.distributed import cluster_kwargs, first_host, local_device_ids
from embedrl_jax.errors import UserError


def slurm_env(**over):
    """What srun sets for task 5 of 16 (4 nodes x 4 tasks), node 1, local rank 1."""
    env = {"SLURM_JOB_ID": "123456", "SLURM_NTASKS": "16", "SLURM_PROCID": "5", "SLURM_LOCALID": "1",
           "SLURM_NODEID": "1", "SLURM_STEP_NODELIST": "gpu[017-018,020],gpu-b3", "SLURM_JOB_NODELIST": "ignored",
           "SLURM_STEP_TASKS_PER_NODE": "4(x4)"}
    env.update(over)
    return {k: v for k, v in env.items() if v is not None}


def test_slurm_one_process_per_gpu():
    """--ntasks-per-node=4 --gpus-per-task=1: each task sees one GPU (SLURM remaps it to ordinal 0);
    jax's own SLURM detection would ask for ordinal = local rank = 1 and fail."""
    name, kw = cluster_kwargs(slurm_env(CUDA_VISIBLE_DEVICES="1"))
    assert name == "slurm"
    assert kw == {"coordinator_address": f"gpu017:{60000 + 123456 % 5000}", "num_processes": 16, "process_id": 5,
                  "local_device_ids": [0]}


def test_slurm_one_process_per_node_sees_all_its_gpus():
    env = slurm_env(SLURM_NTASKS="4", SLURM_PROCID="2", SLURM_LOCALID="0", SLURM_NODEID="2",
                    SLURM_STEP_TASKS_PER_NODE="1(x4)", CUDA_VISIBLE_DEVICES="0,1,2,3,4,5,6,7")
    _, kw = cluster_kwargs(env)
    assert (kw["num_processes"], kw["process_id"], kw["local_device_ids"]) == (4, 2, list(range(8)))
    # no CUDA_VISIBLE_DEVICES: the node's GPU count from SLURM
    env = dict(env, SLURM_GPUS_ON_NODE="4")
    del env["CUDA_VISIBLE_DEVICES"]
    assert cluster_kwargs(env).kwargs["local_device_ids"] == [0, 1, 2, 3]


def test_slurm_tasks_sharing_visible_gpus_split_them_by_local_rank():
    env = slurm_env(SLURM_STEP_TASKS_PER_NODE=None, SLURM_NTASKS_PER_NODE="2", CUDA_VISIBLE_DEVICES="0,1,2,3,4,5,6,7")
    assert cluster_kwargs(env).kwargs["local_device_ids"] == [4, 5, 6, 7]  # local rank 1 of 2
    with pytest.raises(ValueError, match="6 visible GPUs do not split evenly over the 4 processes"):
        cluster_kwargs(slurm_env(CUDA_VISIBLE_DEVICES="0,1,2,3,4,5"))


def test_slurm_overrides_and_cpu_nodes():
    env = slurm_env(JAX_COORDINATOR_ADDRESS="10.0.0.9:7777", JAX_LOCAL_DEVICE_IDS="3")
    kw = cluster_kwargs(env).kwargs
    assert kw["coordinator_address"] == "10.0.0.9:7777" and kw["local_device_ids"] == [3]
    assert cluster_kwargs(slurm_env(JAX_COORDINATOR_PORT="1234")).kwargs["coordinator_address"] == "gpu017:1234"
    assert "local_device_ids" not in cluster_kwargs(slurm_env()).kwargs  # no GPUs known: every local device
    with pytest.raises(ValueError, match="SLURM_STEP_NODELIST"):
        cluster_kwargs(slurm_env(SLURM_STEP_NODELIST=None, SLURM_JOB_NODELIST=None))
    # uneven nodes: this node's entry of '3(x2),2'
    env = slurm_env(SLURM_STEP_TASKS_PER_NODE="3(x2),2", SLURM_NODEID="2", SLURM_LOCALID="1",
                    CUDA_VISIBLE_DEVICES="0,1,2,3")
    assert cluster_kwargs(env).kwargs["local_device_ids"] == [2, 3]


@pytest.mark.parametrize("nodes,first", [("node001", "node001"), ("node001,host2", "node001"),
                                         ("node[001-015],host2", "node001"), ("node[007,009-012]", "node007"),
                                         ("a-b[3]", "a-b3")])
def test_first_host(nodes, first):
    assert first_host(nodes) == first


def test_open_mpi():
    env = {"OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_LOCAL_RANK": "3",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "4", "CUDA_VISIBLE_DEVICES": "0,1,2,3",
           "OMPI_MCA_orte_hnp_uri": "1531576320.0;tcp://10.96.0.1,10.148.0.1:34911"}
    name, kw = cluster_kwargs(env)
    assert name == "openmpi"
    assert kw == {"coordinator_address": f"10.96.0.1:{60000 + 1531576320 // 4096 % 5000}", "num_processes": 8,
                  "process_id": 3, "local_device_ids": [3]}
    env["JAX_COORDINATOR_ADDRESS"] = "head:9000"
    assert cluster_kwargs(env).kwargs["coordinator_address"] == "head:9000"
    del env["JAX_COORDINATOR_ADDRESS"], env["OMPI_MCA_orte_hnp_uri"]  # Open MPI 5: no launcher URI
    with pytest.raises(ValueError, match="JAX_COORDINATOR_ADDRESS"):
        cluster_kwargs(env)


def test_explicit_flags_win_and_go_together():
    env = slurm_env(CUDA_VISIBLE_DEVICES="0")
    name, kw = cluster_kwargs(env, "10.1.1.1:5000", 2, 1)
    assert name == "explicit" and kw == {"coordinator_address": "10.1.1.1:5000", "num_processes": 2, "process_id": 1}
    assert cluster_kwargs({"JAX_LOCAL_DEVICE_IDS": "0,2"}, "h:1", 2, 0).kwargs["local_device_ids"] == [0, 2]
    with pytest.raises(ValueError, match="go together"):
        cluster_kwargs({}, "h:1", None, 0)
    with pytest.raises(ValueError, match="--process-id 2 is outside 0..1"):
        cluster_kwargs({}, "h:1", 2, 2)
    assert cluster_kwargs({"TPU_WORKER_ID": "3"}) == ("auto", {})  # TPU pods: jax detects them itself


def test_local_device_ids_without_gpus():
    assert local_device_ids({}, 0, 1) is None
    assert local_device_ids({"CUDA_VISIBLE_DEVICES": ""}, 0, 1) is None
    with pytest.raises(ValueError, match="JAX_LOCAL_DEVICE_IDS"):
        local_device_ids({"JAX_LOCAL_DEVICE_IDS": "a,b"}, 0, 1)


def test_unreachable_coordinator_times_out_naming_it():
    """A non-coordinator process whose coordinator never answers fails after the timeout with
    the address in the message (jax's client would abort the process without one)."""
    code = ("import argparse; from embedrl_jax.distributed import initialize; "
            "initialize(argparse.Namespace(coordinator='127.0.0.1:9', num_processes=2, process_id=1))")
    env = dict(os.environ, JAX_PLATFORMS="cpu", EMBEDRL_INIT_TIMEOUT="2")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    # a user error (the CLI prints it as one line, exit 2) that is also a ConnectionError
    assert "CoordinatorUnreachable: coordinator 127.0.0.1:9 not reachable within 2 s" in out.stderr
    from embedrl_jax.distributed import CoordinatorUnreachable
    from embedrl_jax.errors import UserError
    assert issubclass(CoordinatorUnreachable, UserError) and issubclass(CoordinatorUnreachable, ConnectionError)


def test_barriers_use_the_coordination_service_with_unique_keys_and_a_long_timeout(monkeypatch):
    """A barrier must not go through CPU collectives (gloo gives up connecting after 30 s, so a
    process waiting while process 0 built the toy base failed); repeated names get fresh keys."""
    calls = []
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(ocp.multihost, "get_barrier_sync_fn", lambda: lambda **kw: calls.append(kw))
    monkeypatch.setattr(fsutil, "_barrier_counts", {})
    monkeypatch.setenv("EMBEDRL_BARRIER_TIMEOUT", "7200")
    fsutil.sync_processes("step")
    fsutil.sync_processes("step")
    fsutil.sync_processes("other")
    assert calls == [{"key": "step#1", "timeout_ms": 7_200_000}, {"key": "step#2", "timeout_ms": 7_200_000},
                     {"key": "other#1", "timeout_ms": 7_200_000}]
    monkeypatch.setenv("EMBEDRL_BARRIER_TIMEOUT", "soon")
    with pytest.raises(UserError, match="EMBEDRL_BARRIER_TIMEOUT: 'soon'"):
        fsutil.sync_processes("step")
