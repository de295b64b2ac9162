"""train-reasoner: EG-RL (GRPO with rewards from the frozen Embedder) on one mesh.

Data: a step's B pairs become 2B prompts, each sampled n times on the live policy weights and
scored by `rl.rollout.EGReward`; advantages come from the `rl.grpo` registry. The step function:
reference and rollout-policy log-probs for every mini-batch, then one AdamW step per mini-batch
(`lax.scan`); mini-batch 0 uses its own stop-gradiented log-probs as the old ones (first ratio
exactly 1). With LoRA the reference (and default judge) is the frozen base; full fine-tuning
keeps one frozen copy only if the KL term or the judge needs it. Setup, loop, resume, export:
train/core.py; the toy task's set-up (toy Embedder, SFT cold start): `toy.reasoner`.
"""
from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding

from .. import lora as lora_lib
from ..data import pipeline
from ..data.inputs import InputConfig, load_image_processor, load_tokenizer
from ..data.records import read_rl_files
from ..data.toy_rl import ToyRLConfig
from ..embed.embedder import Embedder
from ..errors import ConfigError
from ..hf import BATCH_AXES
from ..lora import LoraConfig
from ..models.qwen3_vl.inputs import Buckets
from ..models.qwen3_vl.model import model_def
from ..prompts import load_prompts
from ..reason.reasoner import GENERATE_INPUTS, Reasoner
from ..reason.sequences import completion_logprobs, pack_prompts, repeat_samples, with_completions
from ..rl.config import GRPOConfig, RLDataConfig, RolloutConfig
from ..rl.grpo import grpo_loss, lookup
from ..rl.rewards import RewardConfig
from ..rl.rollout import EGReward, rollout_prompts
from ..sharding import logical_to_spec
from .abstract import abstract_of, packed_spec
from .core import Trainer, TrainerConfig, check_frozen_dtype
from .state import OptimConfig

__all__ = ["RolloutConfig", "GRPOConfig", "RLDataConfig", "ToyRLConfig", "ReasonerRLConfig", "make_grpo_update",
           "ReasonerRLTrainer"]


@dataclasses.dataclass(frozen=True)
class ReasonerRLConfig(TrainerConfig):
    policy: str = ""  # cold-started Reasoner: HF or orbax directory
    embedder: str = ""  # frozen Embedder: HF or orbax directory
    judge: str | None = None  # judge model directory; None = the frozen reference policy
    toy: ToyRLConfig | None = None  # set: `embedrl train-reasoner` builds policy, embedder and data (toy.reasoner)
    data: RLDataConfig = RLDataConfig()  # noqa: RUF009
    rollout: RolloutConfig = RolloutConfig()  # noqa: RUF009
    grpo: GRPOConfig = GRPOConfig()  # noqa: RUF009
    reward: RewardConfig = RewardConfig()  # noqa: RUF009
    lora: LoraConfig | None = None
    optim: OptimConfig = OptimConfig(lr=3e-6, schedule="constant", warmup_steps=0, weight_decay=0.0, clip_norm=1.0)  # noqa: RUF009
    inputs: InputConfig = GENERATE_INPUTS  # the Reasoner's prompts
    embed_inputs: InputConfig = InputConfig()  # noqa: RUF009  (the Embedder's items)
    buckets: Buckets = Buckets(seq_min=64, patch_min=256, rows_min=8)  # noqa: RUF009
    seed: int = 41
    embed_dtype: str = "auto"  # the reward Embedder's weights and forward; auto: as base_dtype's auto
    embed_batch_size: int = 64
    judge_batch_size: int = 64
    judge_max_new_tokens: int = 8
    key_frames_one_based: bool = True

    def __post_init__(self):
        super().__post_init__()
        check_frozen_dtype("embed_dtype", self.embed_dtype)
        r, g = self.rollout, self.grpo
        if (2 * r.pairs_per_step) % g.mini_batches:
            raise ConfigError(f"grpo.mini_batches={g.mini_batches} does not divide the {2 * r.pairs_per_step} prompts of a step")
        if r.samples < 1 or r.max_new_tokens < 1:
            raise ConfigError("rollout.samples and rollout.max_new_tokens must be >= 1")
        if self.lora is not None and self.lora.dropout:
            raise ConfigError("lora.dropout must be 0 for GRPO (the rollout and trainer log-probs must agree)")


SEQ_KEYS = ("input_ids", "attention_mask", "positions", "visual_index", "patches", "segment_ids", "pos_idx", "pos_w",
            "rowcol")
RL_AXES = {"completion_mask": (None, "batch", None), "sample_logp": (None, "batch", None),
           "advantages": (None, "batch")}


# ------------------------------------------------------------------ the step function
def make_grpo_update(mdef, ref_mdef, optimizer, cfg: ReasonerRLConfig):
    """update(state, frozen, ref_params, mb) -> (state, metrics); pure and jit-able.

    `mb`: the rollout batch in M mini-batches on a leading axis: `with_completions` sequence
    arrays, `completion_mask [M, R, T]`, `advantages [M, R]`, the sampler's `sample_logp [M, R, T]`.
    """
    g = cfg.grpo
    logp_of = functools.partial(completion_logprobs, n_new=cfg.rollout.max_new_tokens,
                                dtype=jnp.dtype(cfg.compute_dtype), remat=cfg.remat, chunk_size=g.logprob_chunk)

    def update(state, frozen, ref_params, mb):
        def full(p):
            return lora_lib.combine(p["model"], frozen) if frozen else p["model"]

        seqs = {k: mb[k] for k in SEQ_KEYS if k in mb}
        mask = mb["completion_mask"].astype(jnp.float32)
        m = mask.shape[0]
        zeros = jnp.zeros(mask.shape, jnp.float32)
        ref = jax.lax.map(lambda s: logp_of(ref_mdef, ref_params, s)[0], seqs) if g.kl_coef else zeros
        # the rollout policy's log-probs; mini-batch 0 takes its own (identical, exact) ones below
        old = jax.lax.map(lambda s: logp_of(mdef, full(state["params"]), s)[0], seqs) if m > 1 else zeros

        def one(state, xs):
            seq, msk, adv, ref_lp, old_lp, sample_lp, i = xs

            def loss_fn(p):
                logp, ent = logp_of(mdef, full(p), seq)
                rollout_lp = jnp.where(i == 0, jax.lax.stop_gradient(logp), old_lp)
                loss, met = grpo_loss(
                    logp, rollout_lp, ref_lp if g.kl_coef else None, adv, msk, clip_low=g.clip_low,
                    clip_high=g.clip_high, dual_clip=g.dual_clip, kl_coef=g.kl_coef, aggregation=g.aggregation,
                    policy_loss=g.policy_loss, kl_estimator=g.kl_estimator)
                return loss, (met, ent, rollout_lp)

            (loss, (met, ent, rollout_lp)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
            updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
            new = dict(state, params=optax.apply_updates(state["params"], updates), opt_state=opt_state,
                       step=state["step"] + 1)
            tokens = jnp.maximum(jnp.sum(msk), 1.0)
            met = {k: v for k, v in met.items() if not k.startswith("loss_")}
            met.update(loss=loss, grad_norm=optax.tree.norm(grads), entropy=jnp.sum(ent * msk) / tokens,
                       logprob_gap=jnp.sum(jnp.abs(rollout_lp - sample_lp) * msk) / tokens)
            return new, met

        xs = (seqs, mask, mb["advantages"], ref, old, mb["sample_logp"], jnp.arange(m))
        state, mets = jax.lax.scan(one, state, xs)
        return state, jax.tree.map(jnp.mean, mets)

    return update


# ------------------------------------------------------------------ the trainer
class ReasonerRLTrainer(Trainer):
    """Policy, reference, Embedder, judge, data and the GRPO step; the rest is the trainer core."""

    desc = "train-reasoner"

    def __init__(self, cfg: ReasonerRLConfig, workdir, *, mesh=None, abstract: bool = False):
        if not cfg.policy or not (cfg.embedder or abstract):
            raise ConfigError("set policy= and embedder= (model directories); toy= runs are set up by "
                              "`embedrl train-reasoner` (embedrl_jax.toy.reasoner.prepare)")
        super().__init__(cfg, workdir, mesh=mesh, abstract=abstract)
        self.updates_per_step = cfg.grpo.mini_batches
        handle = self.base = self.load_base(cfg.policy, masters=cfg.lora is None)
        self.mdef, self.ref_mdef = model_def(handle.model_config, cfg.lora), handle.model_def
        judge_is_ref = cfg.reward.use_judge and cfg.judge is None
        model, self.frozen, model_sh = self.split_params(self.mdef, handle.params, cfg.lora)
        # LoRA: the base is the reference (shared, not copied); full fine-tuning keeps the initial
        # weights (the trainable copy is separate, fp32) only if the KL term or the judge reads
        # them, in the frozen dtype
        keep_ref = cfg.lora is not None or cfg.grpo.kl_coef or judge_is_ref
        self.ref_params = handle.params = self.to_frozen(handle.params) if keep_ref else {}
        if not self.ref_params:
            handle.params = None
        if not abstract:
            self._build_models()
        self.setup_state({"model": model}, {"model": model_sh}, self.total_steps() * cfg.grpo.mini_batches)
        frozen_sh = jax.tree.map(lambda x: x.sharding, self.frozen)
        ref_sh = jax.tree.map(lambda x: x.sharding, self.ref_params)
        self.jit_update(make_grpo_update(self.mdef, self.ref_mdef, self.optimizer, cfg), (frozen_sh, ref_sh),
                        batch_args=1)

    def _build_models(self):
        cfg = self.cfg
        self.prompts = load_prompts(cfg.data.prompts)
        self.tokenizer = load_tokenizer(self.source)
        self.image_processor = load_image_processor(self.source, self.base.config)
        self.reasoner = Reasoner(self.base, self.tokenizer, self.image_processor, input_config=cfg.inputs,
                                 max_prompt_tokens=cfg.rollout.max_prompt_tokens, buckets=self.buckets)
        self.embedder = Embedder.from_pretrained(cfg.embedder, mesh=self.mesh, dtype=self.frozen_dtype(cfg.embed_dtype),
                                                 input_config=cfg.embed_inputs)
        judge = None
        if cfg.reward.use_judge:
            if cfg.judge is None:
                who, kw = self.reasoner, {"params": self.ref_params, "model_def": self.ref_mdef}
            else:
                who, kw = Reasoner.from_pretrained(cfg.judge, mesh=self.mesh, dtype=self.frozen_dtype(), buckets=self.buckets), {}
            judge = functools.partial(who.replies, batch_size=cfg.judge_batch_size,
                                      max_new_tokens=cfg.judge_max_new_tokens, **kw)
        self.reward = EGReward(lambda items: self.embedder.encode(items, batch_size=cfg.embed_batch_size, progress=False),
                               cfg.reward, judge=judge, prompts=self.prompts, seed=cfg.seed,
                               key_frames_one_based=cfg.key_frames_one_based)
        if not cfg.data.files:
            raise ConfigError("data.files: no RL pair files")
        self.sources, names, self.skipped = read_rl_files(cfg.data)
        # each step's pairs come from one dataset; video files are no rarer than image files here
        self.sampler = pipeline.MixtureSampler.from_sources(
            self.sources, [cfg.data.weights.get(n, 1.0) for n in names], [any(r.is_video for r in s) for s in self.sources],
            cfg.rollout.pairs_per_step, max_video_sub_batches=None, seed=cfg.seed)

    # -- data
    def data_iterator(self, start_step: int):
        return pipeline.pair_iterator(self.sources, self.sampler, start_step=start_step)

    def steps_per_epoch(self) -> float:
        return sum(len(s) for s in self.sources) / self.cfg.rollout.pairs_per_step

    policy_params = Trainer.model_params

    # -- pieces of a step
    def rollout_batch(self, records):
        """Prompts for the records' pairs; pairs with an over-long prompt are dropped (counted)."""
        prompts = rollout_prompts(records, self.prompts)
        batch = self.reasoner.builder.build(prompts, mode="generate")
        too_long = batch["attention_mask"].sum(-1).reshape(-1, 2).max(-1) > self.cfg.rollout.max_prompt_tokens
        if too_long.any():
            records = [r for r, bad in zip(records, too_long) if not bad]
            prompts = rollout_prompts(records, self.prompts)
            batch = self.reasoner.builder.build(prompts, mode="generate") if records else None
        return records, prompts, batch, int(too_long.sum())

    def minibatches(self, prompts, gen, advantages):
        """Rollouts -> M stacked mini-batches of sequences (prompts split evenly, samples kept together)."""
        m = self.cfg.grpo.mini_batches
        while len(prompts) % m:  # only after dropped pairs: fewer, larger mini-batches
            m -= 1
        n, per = gen.tokens.shape[1], len(prompts) // m
        hf = [self.reasoner.builder.build(prompts[i * per:(i + 1) * per], mode="generate") for i in range(m)]
        packed, deltas = pack_prompts(self.mdef.config, hf, self.buckets)
        tokens, mask, lps = (x.reshape(len(prompts) * n, -1) for x in (gen.tokens, gen.mask, gen.logprobs))
        rows, out = per * n, []
        for i in range(m):
            arrays, d = repeat_samples(packed[i], deltas[i], n)
            sl = slice(i * rows, (i + 1) * rows)
            seq = with_completions(arrays, d, tokens[sl], mask[sl])
            seq.update(completion_mask=mask[sl], sample_logp=np.where(mask[sl], lps[sl], 0.0).astype(np.float32),
                       advantages=np.asarray(advantages[sl], np.float32))
            out.append(seq)
        return {k: np.stack([o[k] for o in out]) for k in out[0]}

    def _sharding(self, k, shape):
        return NamedSharding(self.mesh, logical_to_spec(RL_AXES.get(k) or (None,) + BATCH_AXES[k], shape, self.mesh))

    def device_batch(self, arrays):
        return {k: jax.device_put(v, self._sharding(k, v.shape)) for k, v in arrays.items()}

    def step(self, records, step: int) -> dict:
        """One EG-RL step: rollouts, rewards, advantages, update. Returns the metrics row."""
        cfg, r = self.cfg, self.cfg.rollout
        t0 = time.perf_counter()
        records, prompts, batch, dropped = self.rollout_batch(records)
        if not records:
            return {"step": step + 1, "skipped_pairs": dropped}
        key = jax.random.fold_in(jax.random.key(cfg.seed), step)
        gen = self.reasoner.generate(batch, n=r.samples, max_new_tokens=r.max_new_tokens, temperature=r.temperature,
                                     top_p=r.top_p, top_k=r.top_k, stop=r.stop, params=self.policy_params(),
                                     model_def=self.mdef, key=key, dtype=cfg.compute_dtype)
        t1 = time.perf_counter()
        rewards = self.reward(records, gen.texts, step)
        adv = np.asarray(lookup("advantage", cfg.grpo.advantage)(jnp.asarray(rewards.total), r.samples))
        t2 = time.perf_counter()
        mb = self.device_batch(self.minibatches(prompts, gen, adv))
        with jax.set_mesh(self.mesh):
            self.state, met = self.update(self.state, self.frozen, self.ref_params, mb)
        met = {k: float(v) for k, v in jax.device_get(met).items()}
        t3 = time.perf_counter()
        groups, lengths = rewards.total.reshape(-1, r.samples), gen.mask.sum(-1).reshape(-1)
        return {
            "step": step + 1, **rewards.metrics(), **met,
            "adv/zero_variance_groups": float(np.mean(groups.max(1) == groups.min(1))),
            "response_length": float(lengths.mean()), "response_length_max": int(lengths.max()),
            "truncated": float(np.mean(lengths >= r.max_new_tokens)), "skipped_pairs": dropped, "pairs": len(records),
            "time/generate": t1 - t0, "time/reward": t2 - t1, "time/update": t3 - t2, "step_s": t3 - t0,
        }

    def train_step(self, step: int, records) -> dict:  # the core's hook; `step` keeps its old argument order
        return self.step(records, step)

    def postfix(self, row: dict) -> dict:
        if "reward/outcome" not in row:
            return {}
        return {"outcome": f"{row['reward/outcome']:.4f}", "fmt": f"{row['reward/format']:.2f}"}

    def abstract_update_args(self, *, prompts: int, prompt: int, vision: tuple[int, int] | None = None) -> tuple:
        """(frozen, ref_params, mb) of one update: `prompts` prompts (2 per pair) x rollout.samples,
        prompts of `prompt` tokens, completions of rollout.max_new_tokens, `vision` per mini-batch."""
        m, n, t = self.cfg.grpo.mini_batches, self.cfg.rollout.samples, self.cfg.rollout.max_new_tokens
        rows = prompts // m * n
        spec = packed_spec(self.mdef.config, rows, prompt + t, vision, lead=(m,))
        spec.update(completion_mask=jax.ShapeDtypeStruct((m, rows, t), np.bool_),
                    sample_logp=jax.ShapeDtypeStruct((m, rows, t), np.float32),
                    advantages=jax.ShapeDtypeStruct((m, rows), np.float32))
        mb = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=self._sharding(k, v.shape)) for k, v in spec.items()}
        return abstract_of(self.frozen), abstract_of(self.ref_params), mb

