"""GRPO trainer on tiny models: exact first ratio, sharded update = single-device update, resume."""
import dataclasses
import json

import jax
import numpy as np
import pytest

from embedrl_jax.data.toy_rl import make_toy_keywords
from embedrl_jax.prompts import load_prompts
from embedrl_jax.train.reasoner import GRPOConfig, ReasonerRLConfig, ReasonerRLTrainer, RLDataConfig, RolloutConfig
from embedrl_jax.rl.rewards import RewardConfig
from embedrl_jax.models.qwen3_vl.inputs import Buckets
from embedrl_jax.sharding import MeshConfig
from embedrl_jax.toy.base import build_tiny_base


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("rl")
    m = make_toy_keywords(root / "data", embedder_pairs=8, rl_pairs=64, sft_samples=8, heldout_pairs=8)
    corpus = []
    for path in m["files"].values():
        for line in open(path):
            corpus += [v for v in json.loads(line).values() if isinstance(v, str)]
    corpus += list(load_prompts(m["prompts"])["templates"].values())
    build_tiny_base(root / "policy", seed=1, corpus=corpus, vocab=512)
    build_tiny_base(root / "embedder", seed=2, corpus=corpus, vocab=512)
    cfg = ReasonerRLConfig(
        policy=str(root / "policy"), embedder=str(root / "embedder"),
        data=RLDataConfig(files=(m["files"]["rl_train"],), prompts=m["prompts"]),
        rollout=RolloutConfig(pairs_per_step=2, samples=2, max_new_tokens=8),
        grpo=GRPOConfig(mini_batches=1), reward=RewardConfig(use_judge=False),
        optim=dataclasses.replace(ReasonerRLConfig().optim, lr=1e-3),
        mesh=MeshConfig(data=1, fsdp=-1, tensor=1), buckets=Buckets(seq_min=32, patch_min=64, rows_min=1),
        steps=2, seed=0, compute_dtype="float32", async_checkpoints=False, checkpoint_every=1,
    )
    return root, cfg


def _params(trainer):
    return jax.tree.map(np.asarray, jax.device_get(trainer.state["params"]))


@pytest.mark.slow
def test_first_step_ratio_is_exactly_one(env, tmp_path):
    root, cfg = env
    tr = ReasonerRLTrainer(cfg, tmp_path)
    before = _params(tr)
    row = tr.step(next(tr.data_iterator(0)), 0)
    assert row["ratio_mean"] == 1.0 and row["clip_fraction"] == 0.0
    assert row["logprob_gap"] < 1e-4  # the sampler's log-probs are the trainer's
    assert all(np.isfinite(v) for v in row.values() if isinstance(v, float))
    for k in ("reward/format", "reward/outcome", "kl", "entropy", "response_length", "time/generate",
              "time/reward", "time/update"):
        assert k in row
    after = _params(tr)
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)))


@pytest.mark.slow
def test_sharded_update_equals_single_device(env, tmp_path):
    root, cfg = env
    # lr 1e-4: Adam's first steps move each weight by about +-lr whatever the gradient's size, so a
    # near-zero gradient's rounding shows up as ~lr in the weights; the moments check the gradients
    cfg = dataclasses.replace(cfg, grpo=GRPOConfig(mini_batches=2, kl_coef=0.01),
                              optim=dataclasses.replace(cfg.optim, lr=1e-4))
    eight = ReasonerRLTrainer(cfg, tmp_path / "a")
    one_mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"),
                                 axis_types=(jax.sharding.AxisType.Auto,) * 3)
    one = ReasonerRLTrainer(cfg, tmp_path / "b", mesh=one_mesh)
    assert len(eight.mesh.devices.flat) == 8
    records = next(eight.data_iterator(0))
    records, prompts, batch, _ = eight.rollout_batch(records)
    gen = eight.reasoner.generate(batch, n=2, max_new_tokens=8, temperature=1.0, params=eight.policy_params(),
                                  model_def=eight.mdef, key=jax.random.key(0))
    adv = np.linspace(-1, 1, gen.tokens.shape[0] * 2).astype(np.float32)
    mb = eight.minibatches(prompts, gen, adv)
    assert mb["completion_mask"].shape[0] == 2
    outs = []
    for tr in (eight, one):
        with jax.set_mesh(tr.mesh):
            tr.state, met = tr.update(tr.state, tr.frozen, tr.ref_params, tr.device_batch(mb))
        outs.append((jax.tree.map(np.asarray, jax.device_get(tr.state)), jax.device_get(met)))
    # parameters and optimizer moments (the moments hold the gradients of both mini-batches)
    worst = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(outs[0][0]), jax.tree.leaves(outs[1][0])))
    print(f"sharded GRPO update: max |state difference| {worst:.2e}")
    for a, b in zip(jax.tree.leaves(outs[0][0]), jax.tree.leaves(outs[1][0])):
        np.testing.assert_allclose(a, b, atol=1e-5)
    for k in outs[0][1]:
        np.testing.assert_allclose(outs[0][1][k], outs[1][1][k], atol=1e-5, rtol=1e-5)


def test_resume_is_exact(env, tmp_path):
    root, cfg = env
    straight = ReasonerRLTrainer(cfg, tmp_path / "straight")
    straight.run(2, progress=False)
    split = ReasonerRLTrainer(cfg, tmp_path / "split")
    split.run(1, progress=False)
    resumed = ReasonerRLTrainer(cfg, tmp_path / "split")
    resumed.run(2, progress=False)
    for a, b in zip(jax.tree.leaves(_params(straight)), jax.tree.leaves(_params(resumed))):
        np.testing.assert_array_equal(a, b)
    rows = [json.loads(line) for line in open(tmp_path / "split" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2]
    assert all("reward/outcome" in r for r in rows)


def test_rollouts_end_at_the_stop_string(env, tmp_path):
    """Rollout texts are cut after the first stop string and the tokens past it leave the mask."""
    root, cfg = env
    seen = {}

    def step(stop, name):
        tr = ReasonerRLTrainer(dataclasses.replace(cfg, rollout=dataclasses.replace(cfg.rollout, stop=stop)),
                               tmp_path / name)
        reward = tr.reward
        tr.reward = lambda records, texts, step: seen.setdefault(name, texts) and reward(records, texts, step)
        return tr.step(next(tr.data_iterator(0)), 0)

    free = step((), "free")
    texts = [t for group in seen["free"] for t in group]
    full = next(t for t in texts if len(t) >= 4 and "\ufffd" not in t[1:3])
    stop = full[1:3]  # a string the policy writes at this step, with text after it
    cut = step((stop,), "cut")
    for a, b in zip(texts, (t for group in seen["cut"] for t in group)):
        assert b == (a[: a.find(stop) + len(stop)] if stop in a else a)
    assert cut["response_length"] < free["response_length"]


def test_reference_judge_step(env, tmp_path):
    """The process reward through the default judge (the frozen reference policy, greedy)."""
    root, cfg = env
    cfg = dataclasses.replace(cfg, reward=RewardConfig(use_judge=True), judge_max_new_tokens=4)
    tr = ReasonerRLTrainer(cfg, tmp_path)
    calls = []
    judge = tr.reward.judge
    tr.reward.judge = lambda prompts: calls.append(len(prompts)) or judge(prompts)
    row = tr.step(next(tr.data_iterator(0)), 0)
    assert calls == [2 * 2 * 2]  # one judge call per rollout: 2 pairs x 2 sides x 2 samples
    assert 0.0 <= row["judge/parse_fail"] <= 1.0 and np.isfinite(row["reward/process"])
    assert np.isfinite(row["loss"])


@pytest.mark.slow
def test_toy_reasoner_learns(tmp_path):
    """The toy config end to end from the CLI; EG-RL raises the outcome reward on the toy task
    (seed 0, 120 of the config's 200 steps):
    the mean of the last 30 steps clearly exceeds the first 30 (seen: 0.06 -> 0.15)."""
    from embedrl_jax.cli import main

    assert main(["train-reasoner", "--config", "configs/toy_reasoner_rl.json", "--workdir", str(tmp_path),
                 "--seed", "0", "--steps", "120", "checkpoint_every=60"]) == 0
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    outcome = np.array([r["reward/outcome"] for r in rows])
    assert len(outcome) == 120
    first, last = outcome[:30].mean(), outcome[-30:].mean()
    assert last > first + 0.05, (first, last)
    evidence = json.loads((tmp_path / "toy" / "embedder_eval.json").read_text())
    assert evidence["evidence_correct"] > 3 * evidence["evidence_random"]
    # the whole toy pipeline from the CLI: toy Embedder, SFT cold start, checkpoints, export
    for sub in ("toy/embedder/config.json", "toy/reasoner/config.json", "export/config.json"):
        assert (tmp_path / sub).exists(), sub
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["120", "60"]


@pytest.mark.slow
def test_one_pair_with_equal_rewards_gives_a_finite_loss(env, tmp_path):
    """A batch of one pair whose rollouts all score the same: zero advantages, finite loss, no crash."""
    root, cfg = env
    cfg = dataclasses.replace(cfg, rollout=dataclasses.replace(cfg.rollout, pairs_per_step=1),
                              grpo=GRPOConfig(mini_batches=2, kl_coef=0.01))
    tr = ReasonerRLTrainer(cfg, tmp_path)
    tr.reward.embed = lambda items: np.tile(np.eye(8, dtype=np.float32)[:1], (len(items), 1))
    row = tr.step(next(tr.data_iterator(0)), 0)
    assert row["pairs"] == 1
    assert row["adv/zero_variance_groups"] == 1.0
    assert all(np.isfinite(v) for v in row.values() if isinstance(v, float))
    assert row["pg_loss"] == 0.0
