"""A multi-host run: two processes x 4 CPU devices (gloo collectives) train, evaluate and export
the Embedder like one process with 8 devices, from one shared work directory."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from embedrl_jax.cli import main
from embedrl_jax.safetensors_io import CheckpointReader

RUN = ["--steps", "1", "--config", "configs/toy_embedder.json",
       'data.weights={"toy_i2t_train": 0, "toy_video_retrieval_train": 0, "toy_caption_retrieval_train": 0}',
       "data.sub_batch_size=8", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "lora.dropout=0.0", "checkpoint_every=1",
       "eval_every=1", "eval_pairs=8",
       # small buckets: the two hosts' shares pack to different natural shapes and must agree
       "buckets.seq_min=16", "buckets.patch_min=16", "buckets.rows_min=1"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(workdir, port):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_DEFAULT_MATMUL_PRECISION="highest")
    cmd = [sys.executable, "-m", "embedrl_jax.cli", "--distributed", "--coordinator", f"127.0.0.1:{port}",
           "--num-processes", "2"]
    procs = [subprocess.Popen(cmd + ["--process-id", str(i), "train-embedder", "--workdir", str(workdir), *RUN],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=900)[0])
    finally:
        for p in procs:
            p.kill()
    for i, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"process {i} failed:\n{out[-4000:]}"
    return outs


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path):
    assert main(["train-embedder", "--workdir", str(tmp_path / "one"), *RUN]) == 0
    outs = _launch(tmp_path / "two", _free_port())
    assert "process 1 of 2, 8 devices in all" in outs[1]

    def rows(d):
        return [json.loads(line) for line in open(tmp_path / d / "metrics.jsonl")]

    one, two = rows("one"), rows("two")  # written once, by process 0
    assert [r["step"] for r in two] == [1]
    for a, b in zip(one, two):
        assert abs(a["loss"] - b["loss"]) < 1e-5, (a["loss"], b["loss"])
    assert one[-1]["eval/toy_t2i_heldout/hit1"] == two[-1]["eval/toy_t2i_heldout/hit1"]
    ref, got = CheckpointReader(tmp_path / "one" / "export"), CheckpointReader(tmp_path / "two" / "export")
    assert sorted(ref.keys()) == sorted(got.keys())
    for k in ref.keys():
        np.testing.assert_allclose(got.get(k), ref.get(k), atol=1e-5, rtol=0, err_msg=k)
    assert not [p.name for p in (tmp_path / "two").iterdir() if ".tmp" in p.name]  # no stray temporaries
