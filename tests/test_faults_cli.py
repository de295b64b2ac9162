"""Preemption and faults end to end: the toy trainers run through the CLI in subprocesses, are
signalled, killed, handed damaged checkpoints and NaN steps, and must finish exactly where an
uninterrupted run does (final parameters compared bit for bit through the exported safetensors).

One uninterrupted reference run per trainer is shared by the tests (module fixtures); every run
reuses the reference's toy base and data and a persistent compilation cache, so a run costs
little more than its steps.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest

from embedrl_jax.train.metrics import read_metrics

pytestmark = pytest.mark.slow

STEPS = 6
EMBEDDER = [
    "--steps", str(STEPS), "mesh.fsdp=1", "data.sub_batch_size=4", "grad_cache_chunks=1", "eval_every=0",
    "checkpoint_every=2", "keep_checkpoints=10",
    "data.weights={\"toy_i2t_train\": 0, \"toy_video_retrieval_train\": 0, \"toy_caption_retrieval_train\": 0}",
]
SHARED = ("tiny_base", "data", "toy")  # built once by the reference run, copied into the others
TIMEOUT = 600


def _env(cache: Path) -> dict:
    env = dict(os.environ)
    # one CPU device per run (the test session forces 8), the reference's compiled programs reused
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", "").strip()
    env.update(JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(cache), PYTHONUNBUFFERED="1",
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return env


class Runs:
    def __init__(self, root: Path, verb: str, args: list[str]):
        self.root, self.verb, self.args = root, verb, args
        self.cache = root / "jax-cache"
        self.cache.mkdir(parents=True, exist_ok=True)

    def cmd(self, workdir: Path, *extra: str) -> list[str]:
        return [sys.executable, "-m", "embedrl_jax.cli", self.verb, "--workdir", str(workdir), *self.args, *extra]

    def workdir(self, name: str, like: Path | None = None) -> Path:
        w = self.root / name
        if like is not None:
            w.mkdir(parents=True)
            for sub in SHARED:
                if (like / sub).exists():
                    shutil.copytree(like / sub, w / sub)
        return w

    def start(self, workdir: Path, *extra: str) -> subprocess.Popen:
        log = open(workdir.parent / f"{workdir.name}.{time.monotonic_ns()}.log", "w")
        p = subprocess.Popen(self.cmd(workdir, *extra), stdout=log, stderr=subprocess.STDOUT, text=True,
                             env=_env(self.cache), cwd=Path(__file__).parents[1])
        p.log = log.name
        return p

    def finish(self, p: subprocess.Popen) -> tuple[int, str]:
        rc = p.wait(timeout=TIMEOUT)
        return rc, Path(p.log).read_text()

    def run(self, workdir: Path, *extra: str) -> tuple[int, str]:
        return self.finish(self.start(workdir, *extra))


def _rows(workdir: Path) -> list[dict]:
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return rows


def _wait_for(p: subprocess.Popen, cond, what: str):
    t0 = time.monotonic()
    while not cond():
        if p.poll() is not None:
            raise AssertionError(f"the run ended (rc {p.returncode}) before {what}:\n{Path(p.log).read_text()[-3000:]}")
        if time.monotonic() - t0 > TIMEOUT:
            p.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _weights(workdir: Path) -> bytes:
    return (workdir / "export" / "model.safetensors").read_bytes()


def _losses(workdir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(workdir / "metrics.jsonl")]


def _steps(workdir: Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def _with_reference(runs: Runs) -> Runs:
    """`runs` with its uninterrupted reference run done (`runs.ref`), which every fault run matches."""
    ref = runs.workdir("reference")
    rc, out = runs.run(ref)
    assert rc == 0, out[-3000:]
    runs.ref = ref
    return runs


def _preempt(runs: Runs, steps: int) -> Path:
    """Start a run like the reference, SIGTERM it after its first step: it must exit 0 with a
    checkpoint at the step it stopped at. Returns its workdir."""
    w = runs.workdir("sigterm", like=runs.ref)
    p = runs.start(w)
    _wait_for(p, lambda: len(_rows(w)) >= 1, "the first step")
    p.send_signal(signal.SIGTERM)
    rc, out = runs.finish(p)
    assert rc == 0, out[-3000:]
    stopped = _rows(w)[-1]["step"]
    assert stopped < steps, "the signal came after the run had ended: nothing tested"
    assert f"preempted (SIGTERM): checkpoint saved at step {stopped}" in out
    assert _steps(w)[-1] == stopped
    return w


def _resumes_to_the_reference(runs: Runs, w: Path) -> None:
    """The same command again finishes `w` with the reference's weights and losses, bit for bit."""
    rc, out = runs.run(w)
    assert rc == 0, out[-3000:]
    assert _weights(w) == _weights(runs.ref)
    assert _losses(w) == _losses(runs.ref)


@pytest.fixture(scope="module")
def emb(tmp_path_factory):
    return _with_reference(Runs(tmp_path_factory.mktemp("faults-embedder"), "train-embedder", EMBEDDER))


def test_sigterm_saves_the_agreed_step_exits_0_and_resumes_exactly(emb):
    w = _preempt(emb, STEPS)
    assert not (w / "export").exists()
    _resumes_to_the_reference(emb, w)


def test_sigkill_during_an_async_save_reruns_to_the_same_result(emb):
    w = emb.workdir("kill-in-save", like=emb.ref)
    rc, out = emb.run(w, "debug.kill_in_save_step=4")
    assert rc == -signal.SIGKILL, out[-3000:]
    rc, out = emb.run(w)
    assert rc == 0, out[-3000:]
    assert not [p.name for p in (w / "checkpoints").iterdir() if "tmp" in p.name]
    assert _weights(w) == _weights(emb.ref)
    assert _losses(w) == _losses(emb.ref)


def test_sigkill_during_training_then_a_corrupt_latest_checkpoint_falls_back(emb):
    w = emb.workdir("kill-corrupt", like=emb.ref)
    p = emb.start(w)
    _wait_for(p, lambda: (w / "checkpoints" / "4").is_dir() and len(_rows(w)) >= 5, "checkpoint 4 and step 5")
    p.kill()
    p.wait()
    for f in (w / "checkpoints" / "4" / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(b"\x00not a checkpoint" * 4)
    rc, out = emb.run(w)
    assert rc == 0, out[-3000:]
    assert f"checkpoint {w / 'checkpoints' / '4'} is incomplete or unreadable" in out
    assert "(step 2) instead of damaged step(s) [4]" in out
    assert _weights(w) == _weights(emb.ref)
    assert _losses(w) == _losses(emb.ref)


def test_nan_steps_are_skipped_counted_and_k_in_a_row_stop_the_run(emb):
    w = emb.workdir("nan", like=emb.ref)
    rc, out = emb.run(w, "checkpoint_every=1", "debug.nan_steps=[2,4,5,6]", "max_consecutive_skips=3")
    assert rc == 2, out[-3000:]
    assert "step 6: 3 steps in a row had a non-finite loss or gradient norm" in out
    assert "toy_t2i_train" in out and "checkpoint saved at step 6" in out
    rows = read_metrics(w / "metrics.jsonl")
    assert [r["skipped_steps"] for r in rows] == [0, 1, 0, 1, 1, 1]
    assert [r["skipped_steps_total"] for r in rows] == [0, 1, 1, 2, 3, 4]
    assert np.isnan(rows[1]["loss"]) and np.isfinite(rows[2]["loss"])
    assert "step 2: loss nan" in out
    # reference and NaN run agree up to the skipped step: the loss of step 1 is the same
    assert rows[0]["loss"] == _losses(emb.ref)[0]
    params = {s: ocp.StandardCheckpointer().restore(w / "checkpoints" / str(s) / "state")["params"]
              for s in (1, 2, 3, 6)}

    def same(a, b):
        import jax
        return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))

    assert same(params[1], params[2])  # step 2 skipped: parameters unchanged
    assert not same(params[2], params[3])  # step 3 applied
    assert same(params[3], params[6])  # steps 4-6 skipped
    assert _steps(w)[-1] == 6


REASONER = [
    "--steps", "4", "mesh.fsdp=1", "checkpoint_every=2", "toy.embedder_steps=2", "toy.embedder_batch=8",
    "toy.sft_steps=2", "toy.sft_batch=8", "rollout.pairs_per_step=2", "rollout.samples=2",
    "rollout.max_new_tokens=8",
]


@pytest.fixture(scope="module")
def rl(tmp_path_factory):
    return _with_reference(Runs(tmp_path_factory.mktemp("faults-reasoner"), "train-reasoner", REASONER))


def test_reasoner_sigterm_resumes_exactly(rl):
    _resumes_to_the_reference(rl, _preempt(rl, 4))
