"""train-reasoner: EG-RL (GRPO with rewards from the frozen Embedder) on one mesh.

Policy, reference, Embedder and judge live in one program. With LoRA the reference (and the
default judge) is the frozen base the adapters sit on, so no weights are duplicated; with full
fine-tuning one frozen copy of the initial weights is kept, and only when the KL term or the
judge needs it. Per step the host loop samples 2B x n completions (jitted KV-cache sampler on
the live policy weights), scores them (`EGReward`: one Embedder pass over every rollout, the
outcome terms as one jitted array function, the judge as a greedy generation), and runs one
jitted, donated update: reference and rollout-policy log-probs for all mini-batches, then one
AdamW step per mini-batch (`lax.scan`). With one mini-batch the rollout log-probs are the
policy's own (stop-gradiented), so the first ratio is exactly 1.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from ..config import to_dict
from ..data.inputs import InputConfig
from ..fsutil import primary_first, sync_processes, write_run_config, write_text_atomic
from ..lora import LoraConfig
from ..models.qwen3_vl.inputs import Buckets
from ..reason.reasoner import GENERATE_INPUTS
from ..sharding import MeshConfig
from ..train.state import OptimConfig
from .rewards import RewardConfig

__all__ = ["RolloutConfig", "GRPOConfig", "RLDataConfig", "ToyRLConfig", "ReasonerRLConfig", "make_grpo_update",
           "ReasonerRLTrainer"]


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    pairs_per_step: int = 32  # B: 2B prompts (both sides) per step
    samples: int = 4  # n completions per prompt (one group)
    max_new_tokens: int = 2048
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_prompt_tokens: int = 14336  # a pair with a longer prompt is dropped (counted)
    # A completion ends at the first of these: its text is cut there and the tokens after it
    # leave the completion mask, so rewards, log-probs and the loss never see text past the
    # T-CoT's answer (the policy is not trained on, or rewarded for, whatever it writes after).
    stop: tuple[str, ...] = ("</answer>",)


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    mini_batches: int = 2  # optimizer steps per rollout batch (prompts split evenly)
    advantage: str = "grpo"  # registry name: grpo | drgrpo
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float | None = 3.0
    kl_coef: float = 0.01  # 0 disables the reference entirely
    kl_estimator: str = "k3"
    aggregation: str = "token-mean"
    policy_loss: str = "ppo_clip"
    logprob_chunk: int = 4096  # vocabulary chunk of the fp32 log-prob scan


@dataclasses.dataclass(frozen=True)
class RLDataConfig:
    files: tuple[str, ...] = ()  # MMEB-train style JSON/JSONL pair files (one dataset each)
    weights: dict[str, float] = dataclasses.field(default_factory=dict)
    prompts: str | None = None  # JSON prompt templates merged over the packaged ones
    skip_bad: bool = False


@dataclasses.dataclass(frozen=True)
class ToyRLConfig:
    """The bundled toy task (data/toy_rl.py): a toy Embedder and an SFT cold start, built under
    WORKDIR/toy on first use and reused afterwards."""

    words: int = 2  # content words per side; the cold-started Reasoner names the key 1/words of the time
    embedder_steps: int = 120
    embedder_lr: float = 3e-3
    embedder_batch: int = 32
    sft_steps: int = 300
    sft_lr: float = 3e-3
    sft_batch: int = 32


@dataclasses.dataclass(frozen=True)
class ReasonerRLConfig:
    policy: str = ""  # cold-started Reasoner: HF or orbax directory
    embedder: str = ""  # frozen Embedder: HF or orbax directory
    judge: str | None = None  # judge model directory; None = the frozen reference policy
    toy: ToyRLConfig | None = None  # set: build policy, embedder and data for the toy task
    data: RLDataConfig = RLDataConfig()
    rollout: RolloutConfig = RolloutConfig()
    grpo: GRPOConfig = GRPOConfig()
    reward: RewardConfig = RewardConfig()
    lora: LoraConfig | None = None
    optim: OptimConfig = OptimConfig(lr=3e-6, schedule="constant", warmup_steps=0, weight_decay=0.0, clip_norm=1.0)
    inputs: InputConfig = GENERATE_INPUTS  # the Reasoner's prompts
    embed_inputs: InputConfig = InputConfig()  # the Embedder's items
    mesh: MeshConfig = MeshConfig()
    buckets: Buckets = Buckets(seq_min=64, patch_min=256, rows_min=8)
    steps: int = 100
    seed: int = 41
    compute_dtype: str = "bfloat16"
    base_dtype: str = "float32"
    embed_dtype: str = "float32"
    remat: bool = False
    embed_batch_size: int = 64
    judge_batch_size: int = 64
    judge_max_new_tokens: int = 8
    key_frames_one_based: bool = True
    checkpoint_every: int = 50
    keep_checkpoints: int = 3
    async_checkpoints: bool = True


SEQ_KEYS = ("input_ids", "attention_mask", "positions", "visual_index", "patches", "segment_ids", "pos_idx", "pos_w",
            "rowcol")
RL_AXES = {"completion_mask": (None, "batch", None), "sample_logp": (None, "batch", None),
           "advantages": (None, "batch")}


# ------------------------------------------------------------------ the jitted update
def make_grpo_update(mdef, ref_mdef, optimizer, cfg: ReasonerRLConfig):
    """update(state, frozen, ref_params, mb) -> (state, metrics); pure and jit-able.

    `mb` holds the rollout batch split into M mini-batches on a leading axis: the sequence
    arrays of `reason.sequences.with_completions`, `completion_mask [M, R, T]`, `advantages
    [M, R]` and the sampler's `sample_logp [M, R, T]` (for the rollout/trainer gap metric).
    """
    import optax

    from .. import lora as lora_lib
    from ..reason.sequences import completion_logprobs
    from .grpo import grpo_loss

    g = cfg.grpo
    dtype = jnp.dtype(cfg.compute_dtype)
    n_new = cfg.rollout.max_new_tokens
    logp_of = functools.partial(completion_logprobs, n_new=n_new, dtype=dtype, remat=cfg.remat,
                                chunk_size=g.logprob_chunk)

    def update(state, frozen, ref_params, mb):
        def full(p):
            return lora_lib.combine(p, frozen) if frozen else p

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


# ------------------------------------------------------------------ host side
class ReasonerRLTrainer:
    """Builds policy, reference, Embedder, judge and data from a config; runs (or resumes) GRPO."""

    def __init__(self, cfg: ReasonerRLConfig, workdir, *, mesh=None):
        from .. import lora as lora_lib
        from ..checkpoint import load_model
        from ..embed.embedder import Embedder, load_image_processor
        from ..hf import param_shardings
        from ..models.qwen3_vl.model import init_adapters, model_def
        from ..prompts import load_prompts
        from ..reason.reasoner import Reasoner
        from ..sharding import make_mesh
        from ..train.state import make_optimizer, place_state
        from .rollout import EGReward

        self.cfg = cfg
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.mesh = mesh or make_mesh(cfg.mesh)
        g = cfg.grpo
        if (2 * cfg.rollout.pairs_per_step) % g.mini_batches:
            raise ValueError(f"grpo.mini_batches={g.mini_batches} does not divide the "
                             f"{2 * cfg.rollout.pairs_per_step} prompts of a step")
        if cfg.rollout.samples < 1 or cfg.rollout.max_new_tokens < 1:
            raise ValueError("rollout.samples and rollout.max_new_tokens must be >= 1")
        if cfg.toy is not None:
            policy_dir, embedder_dir, files, prompts_file = self._prepare_toy()
        else:
            if not cfg.policy or not cfg.embedder:
                raise ValueError("set policy= and embedder= (model directories), or toy= for the bundled toy task")
            policy_dir, embedder_dir = Path(cfg.policy), Path(cfg.embedder)
            files, prompts_file = cfg.data.files, cfg.data.prompts
        write_run_config(self.workdir, to_dict(cfg))
        self.prompts = load_prompts(prompts_file)
        self.policy_dir = policy_dir

        def load(path):
            return load_model(path, mesh=self.mesh, dtype=cfg.base_dtype)

        handle = load(policy_dir)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(policy_dir))
        processor = load_image_processor(policy_dir, handle.config)
        self.base = handle
        self.mdef = model_def(handle.model_config, cfg.lora)
        self.ref_mdef = handle.model_def
        key = jax.random.key(cfg.seed)
        shardings = param_shardings(self.mdef, self.mesh)
        judge_is_ref = cfg.reward.use_judge and cfg.judge is None
        if cfg.lora is not None:
            if cfg.lora.dropout:
                raise ValueError("lora.dropout must be 0 for GRPO (the rollout and trainer log-probs must agree)")
            trainable = init_adapters(self.mdef, jax.random.fold_in(key, 1), shardings)
            self.frozen = handle.params
            self.ref_params = handle.params  # the base is the reference: shared, not copied
            trainable_shardings = lora_lib.split(shardings)[0]
        else:
            base_shardings = jax.tree.map(lambda x: x.sharding, handle.params)
            # a real copy: the train state is donated, the reference must survive it
            trainable = jax.jit(lambda t: jax.tree.map(lambda x: jnp.array(x, jnp.float32, copy=True), t),
                                out_shardings=base_shardings)(handle.params)
            self.frozen = {}
            self.ref_params = handle.params if (g.kl_coef or judge_is_ref) else {}
            trainable_shardings = shardings
            if not self.ref_params:
                handle.params = None  # nothing needs the initial weights: do not keep a second copy
        self.reasoner = Reasoner(handle, tokenizer, processor, input_config=cfg.inputs,
                                 max_prompt_tokens=cfg.rollout.max_prompt_tokens, buckets=cfg.buckets)
        self.embedder = Embedder.from_pretrained(embedder_dir, mesh=self.mesh, dtype=cfg.embed_dtype,
                                                 input_config=cfg.embed_inputs)
        judge = None
        if cfg.reward.use_judge:
            if cfg.judge is None:
                judge_args = (self.reasoner, self.ref_mdef, self.ref_params)
            else:
                other = Reasoner.from_pretrained(cfg.judge, mesh=self.mesh, dtype=cfg.base_dtype,
                                                 buckets=cfg.buckets)
                judge_args = (other, other.handle.model_def, other.handle.params)
            judge = functools.partial(self._judge, *judge_args, batch_size=cfg.judge_batch_size,
                                      max_new_tokens=cfg.judge_max_new_tokens)
        self.reward = EGReward(lambda items: self.embedder.encode(items, batch_size=cfg.embed_batch_size,
                                                                  progress=False),
                               cfg.reward, judge=judge, prompts=self.prompts, seed=cfg.seed,
                               key_frames_one_based=cfg.key_frames_one_based)
        self.optimizer = make_optimizer(cfg.optim, cfg.steps * g.mini_batches)
        self._build_data(files)
        self.state, self.state_shardings, self.state_shapes = place_state(
            trainable, self.optimizer, trainable_shardings, self.mesh)
        self.replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        frozen_sh = jax.tree.map(lambda x: x.sharding, self.frozen)
        ref_sh = jax.tree.map(lambda x: x.sharding, self.ref_params)
        self._update = jax.jit(make_grpo_update(self.mdef, self.ref_mdef, self.optimizer, cfg),
                               in_shardings=(self.state_shardings, frozen_sh, ref_sh, None),  # batches arrive placed
                               out_shardings=(self.state_shardings, self.replicated), donate_argnums=(0,))

    # -- toy task
    def _prepare_toy(self):
        from ..data.toy_rl import make_toy_keywords

        toy = self.cfg.toy
        root = self.workdir / "toy"
        base = root / "base"

        def files():  # process 0 writes them; every other host then reads them
            manifest = make_toy_keywords(root / "data", seed=self.cfg.seed, words=toy.words)
            if not (base / "config.json").exists():
                from ..prompts import load_prompts
                from ..train.embedder import build_tiny_base

                corpus = []
                for path in manifest["files"].values():
                    for line in Path(path).read_text().splitlines():
                        corpus += [v for v in json.loads(line).values() if isinstance(v, str)]
                corpus += list(load_prompts(manifest["prompts"])["templates"].values()) + [self.cfg.embed_inputs.suffix]
                build_tiny_base(base, seed=self.cfg.seed, corpus=corpus)
            return manifest

        manifest = primary_first(files, "embedrl_toy_rl_files")
        # the toy Embedder and SFT runs below are collective (every host takes part)
        embedder = root / "embedder"
        if not (embedder / "config.json").exists():
            self._train_toy_embedder(base, manifest, embedder)
        reasoner = root / "reasoner"
        if not (reasoner / "config.json").exists():
            from ..fsutil import replace_dir
            from ..train.sft import SFTConfig, SFTDataConfig, run_sft

            scfg = SFTConfig(model=str(base), data=SFTDataConfig(files=(manifest["files"]["sft"],)), lora=None,
                             optim=OptimConfig(lr=toy.sft_lr, schedule="cosine", warmup_steps=10, weight_decay=0.0),
                             mesh=self.cfg.mesh, batch_size=toy.sft_batch, max_completion_tokens=self.cfg.rollout.max_new_tokens,
                             steps=toy.sft_steps, seed=self.cfg.seed, compute_dtype="float32",
                             checkpoint_every=toy.sft_steps, buckets=self.cfg.buckets)
            out = run_sft(scfg, root / "sft_run", mesh=self.mesh)
            if jax.process_index() == 0:
                replace_dir(out, reasoner)
            sync_processes("embedrl_toy_reasoner")
        return reasoner, embedder, (manifest["files"]["rl_train"],), manifest["prompts"]

    def _train_toy_embedder(self, base, manifest, out):
        from ..data.records import read_mmeb
        from ..train.embedder import DataConfig, EmbedderTrainConfig, EmbedderTrainer

        toy = self.cfg.toy
        ecfg = EmbedderTrainConfig(
            model=str(base), lora=None,
            optim=OptimConfig(lr=toy.embedder_lr, schedule="cosine", warmup_steps=10, weight_decay=0.01),
            data=DataConfig(toy=False, mmeb=(manifest["files"]["embedder_train"],), sub_batch_size=toy.embedder_batch),
            inputs=self.cfg.embed_inputs, mesh=self.cfg.mesh, buckets=Buckets(seq_min=64, patch_min=64, rows_min=1),
            steps=toy.embedder_steps, seed=self.cfg.seed, compute_dtype="float32", checkpoint_every=toy.embedder_steps,
            async_checkpoints=False,
        )
        trainer = EmbedderTrainer(ecfg, self.workdir / "toy" / "embedder_run", mesh=self.mesh)
        trainer.run(progress=False)
        # how much the evidence matters to this Embedder: held-out Hit@1 by T-CoT quality
        recs = read_mmeb(manifest["files"]["embedder_heldout"])[0][:128]
        rng = np.random.default_rng(self.cfg.seed)
        from ..data.toy_rl import tcot_for

        def wrong(item):
            words = item["text"].split()[-toy.words:]
            return dict(item, tcot=tcot_for(words, words[int(rng.integers(toy.words))]))

        report = {}
        for name, f in (("evidence_correct", lambda it: it), ("evidence_random", wrong),
                        ("no_tcot", lambda it: {k: v for k, v in it.items() if k != "tcot"})):
            q = trainer.embed_items([f(r.query) for r in recs])
            p = trainer.embed_items([f(r.positive) for r in recs])
            report[name] = float(np.mean(np.argmax(q @ p.T, axis=1) == np.arange(len(recs))))
        report["chance"] = 1.0 / len(recs)
        trainer.export(out, overwrite=True)
        if jax.process_index() == 0:
            write_text_atomic(self.workdir / "toy" / "embedder_eval.json", json.dumps(report, indent=2))

    # -- data
    def _build_data(self, files):
        from ..data import pipeline
        from ..data.records import read_mmeb

        if not files:
            raise ValueError("data.files: no RL pair files")
        sources, names, skipped = [], [], {}
        for path in files:
            records, report = read_mmeb(path, skip_bad=self.cfg.data.skip_bad)
            if not records:
                raise ValueError(f"{path}: no usable pairs")
            sources.append(records)
            names.append(Path(path).stem)
            skipped[Path(path).stem] = report.skipped
        self.skipped = skipped
        weights = [self.cfg.data.weights.get(n, 1.0) for n in names]
        self.sampler = pipeline.MixtureSampler.from_sources(
            sources, weights, [False] * len(sources), self.cfg.rollout.pairs_per_step, seed=self.cfg.seed)
        self.sources = sources

    def _iterator(self, start_step):
        from ..data import pipeline

        return pipeline.pair_iterator(self.sources, self.sampler, start_step=start_step)

    def policy_params(self):
        from .. import lora as lora_lib

        p = self.state["params"]
        return lora_lib.combine(p, self.frozen) if self.frozen else p

    # -- pieces of a step
    @staticmethod
    def _judge(reasoner, mdef, params, prompts, *, batch_size=None, max_new_tokens=8):
        replies = []
        size = batch_size or len(prompts)
        for i in range(0, len(prompts), size):
            batch = reasoner.prepare([{"text": p} for p in prompts[i:i + size]])
            gen = reasoner.generate(batch, n=1, max_new_tokens=max_new_tokens, temperature=0.0, params=params,
                                    model_def=mdef)
            replies += [t[0] for t in gen.texts]
        return replies

    def rollout_batch(self, records):
        """Prompts for the records' pairs; pairs with an over-long prompt are dropped (counted)."""
        from .rollout import rollout_prompts

        prompts = rollout_prompts(records, self.prompts)
        batch = self.reasoner.builder.build(prompts, mode="generate")
        lengths = batch["attention_mask"].sum(-1)
        too_long = lengths.reshape(-1, 2).max(-1) > self.cfg.rollout.max_prompt_tokens
        if too_long.any():
            records = [r for r, bad in zip(records, too_long) if not bad]
            prompts = rollout_prompts(records, self.prompts)
            batch = self.reasoner.builder.build(prompts, mode="generate") if records else None
        return records, prompts, batch, int(too_long.sum())

    def minibatches(self, prompts, gen, advantages):
        """Rollouts -> M stacked mini-batches of sequences (prompts split evenly, samples kept together)."""
        from ..reason.sequences import pack_prompts, repeat_samples, with_completions

        m = self.cfg.grpo.mini_batches
        while len(prompts) % m:  # only after dropped pairs: fewer, larger mini-batches
            m -= 1
        n = gen.tokens.shape[1]
        per = len(prompts) // m
        hf = [self.reasoner.builder.build(prompts[i * per:(i + 1) * per], mode="generate") for i in range(m)]
        packed, deltas = pack_prompts(self.mdef.config, hf, self.cfg.buckets)
        tokens = gen.tokens.reshape(len(prompts) * n, -1)
        mask = gen.mask.reshape(len(prompts) * n, -1)
        lps = gen.logprobs.reshape(len(prompts) * n, -1)
        rows = per * n
        out = []
        for i in range(m):
            arrays, d = repeat_samples(packed[i], deltas[i], n)
            sl = slice(i * rows, (i + 1) * rows)
            seq = with_completions(arrays, d, tokens[sl], mask[sl])
            seq.update(completion_mask=mask[sl], sample_logp=np.where(mask[sl], lps[sl], 0.0).astype(np.float32),
                       advantages=np.asarray(advantages[sl], np.float32))
            out.append(seq)
        return {k: np.stack([o[k] for o in out]) for k in out[0]}

    def device_batch(self, arrays):
        from jax.sharding import NamedSharding

        from ..hf import BATCH_AXES
        from ..sharding import logical_to_spec

        def sharding(k, v):
            names = RL_AXES.get(k) or (None,) + BATCH_AXES[k]
            return NamedSharding(self.mesh, logical_to_spec(names, v.shape, self.mesh))

        return {k: jax.device_put(v, sharding(k, v)) for k, v in arrays.items()}

    def step(self, records, step: int) -> dict:
        """One EG-RL step: rollouts, rewards, advantages, update. Returns the metrics row."""
        from .grpo import lookup

        cfg, r = self.cfg, self.cfg.rollout
        t0 = time.perf_counter()
        records, prompts, batch, dropped = self.rollout_batch(records)
        if not records:
            return {"step": step + 1, "skipped_pairs": dropped}
        key = jax.random.fold_in(jax.random.key(cfg.seed), step)
        gen = self.reasoner.generate(batch, n=r.samples, max_new_tokens=r.max_new_tokens, temperature=r.temperature,
                                     top_p=r.top_p, top_k=r.top_k, stop=r.stop, params=self.policy_params(),
                                     model_def=self.mdef, key=key)
        t1 = time.perf_counter()
        rewards = self.reward(records, gen.texts, step)
        adv = np.asarray(lookup("advantage", cfg.grpo.advantage)(jnp.asarray(rewards.total), r.samples))
        t2 = time.perf_counter()
        mb = self.device_batch(self.minibatches(prompts, gen, adv))
        with jax.set_mesh(self.mesh):
            self.state, met = self._update(self.state, self.frozen, self.ref_params, mb)
        met = {k: float(v) for k, v in jax.device_get(met).items()}
        t3 = time.perf_counter()
        groups = rewards.total.reshape(-1, r.samples)
        lengths = gen.mask.sum(-1).reshape(-1)
        return {
            "step": step + 1, **rewards.metrics(), **met,
            "adv/zero_variance_groups": float(np.mean(groups.max(1) == groups.min(1))),
            "response_length": float(lengths.mean()), "response_length_max": int(lengths.max()),
            "truncated": float(np.mean(lengths >= r.max_new_tokens)),
            "skipped_pairs": dropped, "pairs": len(records),
            "time/generate": t1 - t0, "time/reward": t2 - t1, "time/update": t3 - t2, "step_s": t3 - t0,
        }

    # -- loop
    def run(self, steps: int | None = None, *, progress: bool = True) -> dict:
        from tqdm import tqdm

        from ..train.checkpoint import TrainCheckpointer
        from ..train.metrics import MetricsWriter
        from ..train.state import schedule

        cfg = self.cfg
        total = cfg.steps if steps is None else steps
        ckpt = TrainCheckpointer(self.workdir / "checkpoints", max_to_keep=cfg.keep_checkpoints,
                                 async_save=cfg.async_checkpoints)
        restored, data_state = ckpt.restore_latest(self.state_shapes, self.state_shardings)
        start = 0
        if restored is not None:
            self.state, start = restored, int(data_state["step"])
        it = self._iterator(start)
        writer = MetricsWriter(self.workdir / "metrics.jsonl", resume_step=start, enabled=jax.process_index() == 0)
        lr_fn = schedule(cfg.optim, cfg.steps * cfg.grpo.mini_batches)
        bar = tqdm(range(start, total), initial=start, total=total, disable=not progress, desc="train-reasoner")
        last = {}
        try:
            for step in bar:
                row = self.step(next(it), step)
                row["lr"] = float(lr_fn(step * cfg.grpo.mini_batches))
                writer.write(row)
                last = row
                if "reward/outcome" in row:
                    bar.set_postfix(outcome=f"{row['reward/outcome']:.4f}", fmt=f"{row['reward/format']:.2f}")
                if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == total:
                    ckpt.save(step + 1, self.state, {"step": step + 1, "iterator": it.get_state()}, force=True)
        finally:
            ckpt.close()
            writer.close()
        return last

    def export(self, out_dir, *, overwrite=False):
        """The trained Reasoner (LoRA merged) as an HF directory with its tokenizer and processor."""
        from ..hf import Qwen3VLHandle, save_hf

        mdef, merged = self.mdef.merged(self.policy_params())
        handle = Qwen3VLHandle(self.base.config, mdef, merged, self.mesh, source=self.policy_dir)
        return save_hf(handle, out_dir, overwrite=overwrite)
