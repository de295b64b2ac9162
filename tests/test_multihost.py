"""Multi-host runs: two processes x 4 CPU devices (gloo collectives), one shared work directory,
train, evaluate and export like one process with 8 devices. train-reasoner here; train-embedder
in test_multihost_order.py, with a mesh that interleaves the processes (it covers the contiguous
order too: that run's assertions are a superset)."""
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


def _launch(workdir, port, verb="train-embedder", run=RUN):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=os.environ["XLA_FLAGS"].replace("device_count=8", "device_count=4"),
               JAX_DEFAULT_MATMUL_PRECISION="highest")
    cmd = [sys.executable, "-m", "embedrl_jax.cli", "--distributed", "--coordinator", f"127.0.0.1:{port}",
           "--num-processes", "2"]
    procs = [subprocess.Popen(cmd + ["--process-id", str(i), verb, "--workdir", str(workdir), *run],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    return wait_all(procs)


def wait_all(procs, timeout=900) -> list[str]:
    """Every process's output; on any failure the assertion shows each process's exit code and
    output tail (a hang on one host is usually explained by an error on another)."""
    outs = []
    try:
        for p in procs:
            try:
                outs.append(p.communicate(timeout=timeout)[0])
            except subprocess.TimeoutExpired:
                p.kill()
                outs.append(p.communicate()[0])
    finally:
        for p in procs:
            p.kill()
    failed = [i for i, p in enumerate(procs) if p.returncode != 0]
    assert not failed, f"process(es) {failed} failed:\n" + "\n".join(
        f"--- process {i} (exit {p.returncode}) ---\n{(out or '')[-4000:]}"
        for i, (p, out) in enumerate(zip(procs, outs)))
    return outs


def _same_exports(a, b, atol):
    ref, got = CheckpointReader(a), CheckpointReader(b)
    assert sorted(ref.keys()) == sorted(got.keys())
    for k in ref.keys():
        np.testing.assert_allclose(got.get(k), ref.get(k), atol=atol, rtol=0, err_msg=k)


@pytest.mark.slow
def test_two_processes_run_eg_rl_like_one(tmp_path):
    """train-reasoner: every host samples the same rollouts (gathered across hosts), scores them
    with the frozen Embedder and takes the same update as one host does."""
    from embedrl_jax.data.toy_rl import make_toy_keywords
    from embedrl_jax.prompts import load_prompts
    from embedrl_jax.toy.base import build_tiny_base

    m = make_toy_keywords(tmp_path / "data", embedder_pairs=8, rl_pairs=16, sft_samples=8, heldout_pairs=8)
    corpus = [v for path in m["files"].values() for line in open(path)
              for v in json.loads(line).values() if isinstance(v, str)]
    corpus += list(load_prompts(m["prompts"])["templates"].values())
    build_tiny_base(tmp_path / "policy", seed=1, corpus=corpus, vocab=512)
    build_tiny_base(tmp_path / "embedder", seed=2, corpus=corpus, vocab=512)
    cfg = {"policy": str(tmp_path / "policy"), "embedder": str(tmp_path / "embedder"),
           "data": {"files": [m["files"]["rl_train"]], "prompts": m["prompts"]},
           "rollout": {"pairs_per_step": 2, "samples": 2, "max_new_tokens": 8}, "grpo": {"mini_batches": 1},
           "reward": {"use_judge": False}, "optim": {"lr": 1e-3}, "mesh": {"data": 2, "fsdp": 2, "tensor": 2},
           "buckets": {"seq_min": 32, "patch_min": 64, "rows_min": 1}, "steps": 1, "seed": 0,
           "compute_dtype": "float32", "checkpoint_every": 1}
    (tmp_path / "rl.json").write_text(json.dumps(cfg))
    run = ["--config", str(tmp_path / "rl.json")]
    assert main(["train-reasoner", "--workdir", str(tmp_path / "one"), *run]) == 0
    _launch(tmp_path / "two", _free_port(), "train-reasoner", run)
    one, two = ([json.loads(line) for line in open(tmp_path / d / "metrics.jsonl")] for d in ("one", "two"))
    assert [r["step"] for r in two] == [1]
    for k in ("loss", "reward/outcome", "reward/acc", "grad_norm", "response_length"):
        assert abs(one[0][k] - two[0][k]) < 1e-6, (k, one[0][k], two[0][k])
    _same_exports(tmp_path / "one" / "export", tmp_path / "two" / "export", 1e-6)


def test_barrier_inside_a_process_0_only_build_is_refused(tmp_path):
    """primary_first's build runs on process 0 alone first: a barrier there would pair with the other
    processes' wait for the build and deadlock the run, so it is refused, with one process too."""
    from embedrl_jax.fsutil import primary_first, sync_processes
    from embedrl_jax.toy.base import build_tiny_base

    with pytest.raises(RuntimeError, match="inside the process-0-only build 'tiny'"):
        primary_first(lambda: sync_processes("embedrl_save_hf"), "tiny")
    with pytest.raises(RuntimeError, match="inside the process-0-only build 'outer'"):
        primary_first(lambda: primary_first(lambda: None, "inner"), "outer")
    assert primary_first(lambda: 7, "plain") == 7
    sync_processes("after")  # the refusal ends with the build
    # the toy base is built inside primary_first by every trainer: it must take no barrier
    path = primary_first(lambda: build_tiny_base(tmp_path / "base", vocab=512), "embedrl_tiny_base")
    assert (path / "config.json").exists()
