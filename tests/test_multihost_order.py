"""Multi-host batches for any device order: two processes x 4 CPU devices whose mesh interleaves
the processes along the batch axes (as a TPU slice's torus order does) train like one process."""
import json
import os
import subprocess
import sys

import pytest

from embedrl_jax.cli import main
from test_multihost import RUN, _free_port, _same_exports, wait_all

# The project's meshes (sharding.make_mesh without explicit devices) take the devices in the order
# [p0 d0, p0 d1, p1 d0, p1 d1, p0 d2, p0 d3, p1 d2, p1 d3], so the (data=2, fsdp=2, tensor=2) mesh
# gives process 0 batch blocks 0 and 2, process 1 blocks 1 and 3 (tensor pairs stay inside a
# process). jax.devices() itself is left alone: jax's own multihost helpers build meshes from it.
INTERLEAVED_MAIN = """
import sys, jax
from embedrl_jax import sharding
make_mesh = sharding.make_mesh
def interleaved_mesh(config=None, devices=None):
    if devices is None:
        ds = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
        by = [[d for d in ds if d.process_index == p] for p in sorted({d.process_index for d in ds})]
        devices = [d for i in range(0, len(by[0]), 2) for host in by for d in host[i:i + 2]]
        print("DEVICE ORDER", [d.process_index for d in devices], flush=True)
    return make_mesh(config, devices)
sharding.make_mesh = interleaved_mesh
from embedrl_jax.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_two_interleaved_processes_train_like_one(tmp_path):
    assert main(["train-embedder", "--workdir", str(tmp_path / "one"), *RUN]) == 0
    port = _free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=os.environ["XLA_FLAGS"].replace("device_count=8", "device_count=4"),
               JAX_DEFAULT_MATMUL_PRECISION="highest")
    cmd = [sys.executable, "-c", INTERLEAVED_MAIN, "--distributed", "--coordinator", f"127.0.0.1:{port}",
           "--num-processes", "2"]
    verb = ["train-embedder", "--workdir", str(tmp_path / "two"), *RUN]
    procs = [subprocess.Popen(cmd + ["--process-id", str(i), *verb], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = wait_all(procs)
    assert "process 1 of 2, 8 devices in all" in outs[1]
    assert "DEVICE ORDER [0, 0, 1, 1, 0, 0, 1, 1]" in outs[0]
    one = [json.loads(line) for line in open(tmp_path / "one" / "metrics.jsonl")]
    two = [json.loads(line) for line in open(tmp_path / "two" / "metrics.jsonl")]
    assert [r["step"] for r in two] == [1]
    for a, b in zip(one, two):
        assert abs(a["loss"] - b["loss"]) < 1e-5, (a["loss"], b["loss"])
    assert one[-1]["eval/toy_t2i_heldout/hit1"] == two[-1]["eval/toy_t2i_heldout/hit1"]
    _same_exports(tmp_path / "one" / "export", tmp_path / "two" / "export", 1e-5)
    assert not [p.name for p in (tmp_path / "two").iterdir() if ".tmp" in p.name]  # no stray temporaries


# Two processes x 4 CPU devices, mesh (data=1, fsdp=4, tensor=2) whose tensor pairs join a device
# of process 0 with one of process 1 (as jax.make_mesh lays tensor=4 over two hosts of a v5p
# slice): every batch row sits on both processes, so they form one data shard and both load the
# whole step; global_batch must place it so the jitted step sees exactly the step's samples.
SHARED_ROWS_MAIN = """
import sys, jax, numpy as np
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"127.0.0.1:{sys.argv[1]}", num_processes=2, process_id=int(sys.argv[2]))
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
from embedrl_jax.sharding import data_shard, global_batch, to_host
ds = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
h0, h1 = ds[:4], ds[4:]
mesh = Mesh(np.array([[[a, b] for a, b in zip(h0, h1)]]), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
index, count = data_shard(mesh)
print("SHARD", jax.process_index(), index, count, flush=True)
samples = np.arange(8 * 3, dtype=np.float32).reshape(8, 3) + 1  # the step's 8 samples
per = len(samples) // count
local = samples[index * per:(index + 1) * per]
x = global_batch(mesh, {"x": local}, {"x": ("batch", None)})["x"]
assert x.sharding.spec == P("fsdp", None), x.sharding.spec
for s in x.addressable_shards:  # each device holds its rows of the step
    np.testing.assert_array_equal(np.asarray(s.data), samples[s.index])
total = jax.jit(lambda a: (a * a).sum(axis=1), out_shardings=NamedSharding(mesh, P()))(x)
np.testing.assert_array_equal(to_host(total), (samples * samples).sum(axis=1))
print("SHARED ROWS OK", jax.process_index(), flush=True)
try:  # splitting the step by process index gives the two replicas of each row different samples
    global_batch(mesh, {"x": samples[jax.process_index() * 4:][:4]}, {"x": ("batch", None)})
except ValueError as e:
    print("REFUSED", e, flush=True)
"""


def test_two_processes_sharing_every_row_load_the_same_samples():
    port = _free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=os.environ["XLA_FLAGS"].replace("device_count=8", "device_count=4"))
    procs = [subprocess.Popen([sys.executable, "-c", SHARED_ROWS_MAIN, str(port), str(i)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = wait_all(procs, timeout=600)
    for i, out in enumerate(outs):
        assert f"SHARD {i} 0 1" in out and f"SHARED ROWS OK {i}" in out
        assert "REFUSED processes 0 and 1 hold the same batch rows (data shard 0) but passed different ['x']" in out
