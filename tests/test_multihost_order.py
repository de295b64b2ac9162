"""Multi-host batches for any device order: two processes x 4 CPU devices whose mesh interleaves
the processes along the batch axes (as a TPU slice's torus order does) train like one process."""
import json
import os
import subprocess
import sys

import pytest

from embedrl_jax.cli import main
from test_multihost import RUN, _free_port, _same_exports

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
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_DEFAULT_MATMUL_PRECISION="highest")
    cmd = [sys.executable, "-c", INTERLEAVED_MAIN, "--distributed", "--coordinator", f"127.0.0.1:{port}",
           "--num-processes", "2"]
    verb = ["train-embedder", "--workdir", str(tmp_path / "two"), *RUN]
    procs = [subprocess.Popen(cmd + ["--process-id", str(i), *verb], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=900)[0])
    finally:
        for p in procs:
            p.kill()
    for i, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"process {i} failed:\n{out[-4000:]}"
    assert "process 1 of 2, 8 devices in all" in outs[1]
    assert "DEVICE ORDER [0, 0, 1, 1, 0, 0, 1, 1]" in outs[0]
    one = [json.loads(line) for line in open(tmp_path / "one" / "metrics.jsonl")]
    two = [json.loads(line) for line in open(tmp_path / "two" / "metrics.jsonl")]
    assert [r["step"] for r in two] == [1]
    for a, b in zip(one, two):
        assert abs(a["loss"] - b["loss"]) < 1e-5, (a["loss"], b["loss"])
    assert one[-1]["eval/toy_t2i_heldout/hit1"] == two[-1]["eval/toy_t2i_heldout/hit1"]
    _same_exports(tmp_path / "one" / "export", tmp_path / "two" / "export", 1e-5)
