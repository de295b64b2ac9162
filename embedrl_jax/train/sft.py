"""sft-reasoner: supervised cold start of the Reasoner on given T-CoTs.

Every sample is one prompt item (rendered exactly as the sampler renders it: `Reasoner.prepare`,
generate mode, left padded) and one completion (its tokens, then ``<|im_end|>``); the samples
are read by `data.sft`. The step function: the token-mean negative log-likelihood of the
completion tokens, computed by `reason.sequences.completion_logprobs` (the function GRPO scores
rollouts with), summed over the step's micro-batches (stacked on a leading axis, one static
shape), clipped, AdamW on fp32 master weights. The data order is a pure function of the step
(one permutation per epoch from (seed, epoch)). Setup, loop, resume and export: train/core.py.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .. import lora as lora_lib
from ..data.inputs import InputConfig, load_image_processor, load_tokenizer
from ..data.records import RecordError
from ..data.sft import SampleOrder, SFTDataConfig, SFTDataReport, SFTSample, load_sft_samples, toy_sft_files
from ..errors import ConfigError, UserError
from ..fsutil import primary_first
from ..hf import BATCH_AXES
from ..lora import LoraConfig
from ..models.qwen3_vl.inputs import Buckets, host_share, hosts_shape
from ..models.qwen3_vl.model import model_def
from ..reason.reasoner import GENERATE_INPUTS, Reasoner
from ..reason.sequences import completion_logprobs, pack_prompts, with_completions
from ..sharding import global_batch
from ..toy.base import build_tiny_base
from .abstract import abstract_of, packed_spec, placed_spec
from .core import Trainer, TrainerConfig
from .state import OptimConfig

__all__ = ["SFTConfig", "SFTDataConfig", "SFTDataReport", "SFTSample", "SFTTrainer", "SampleOrder",
           "completion_nll", "load_sft_samples", "make_update", "run_sft", "toy_sft_files"]

log = logging.getLogger(__name__)

EOS_TOKEN = "<|im_end|>"


@dataclasses.dataclass(frozen=True)
class SFTConfig(TrainerConfig):
    model: str = "tiny"  # HF dir (config.json, safetensors, tokenizer) or orbax dir (params/); "tiny": a toy base built offline
    data: SFTDataConfig = SFTDataConfig()  # noqa: RUF009
    lora: LoraConfig | None = None  # None: full fine-tuning
    optim: OptimConfig = OptimConfig(lr=1e-5, warmup_steps=10, weight_decay=0.0)  # noqa: RUF009
    inputs: InputConfig = GENERATE_INPUTS
    # prompt lengths, completion lengths and patch rows are bucketed (static shapes)
    buckets: Buckets = Buckets(seq_min=64, patch_min=64, rows_min=4)  # noqa: RUF009
    batch_size: int = 8  # samples per step (global)
    micro_batches: int = 1  # the step's samples in this many stacked micro-batches (gradient accumulation)
    max_completion_tokens: int = 1024  # completion tokens (EOS included) kept; longer ones are truncated
    max_prompt_tokens: int = 16384
    vocab_chunk: int = 4096  # log-probs walk the vocabulary in chunks of this size

    def __post_init__(self):
        super().__post_init__()
        for name in ("batch_size", "micro_batches", "max_completion_tokens", "max_prompt_tokens", "vocab_chunk"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size % self.micro_batches:
            raise ConfigError(f"batch_size={self.batch_size} is not divisible by micro_batches={self.micro_batches}")


# ------------------------------------------------------------------ the jitted step
def completion_nll(mdef, params, batch, *, dtype=jnp.float32, remat=False, rng=None, chunk_size=4096):
    """(-sum logp, sum entropy, token count) over the completion tokens of one micro-batch.

    `batch` holds `with_completions` arrays [R, P + T] and ``mask`` [R, T] (1 for completion
    tokens, EOS included).
    """
    mask = batch["mask"].astype(jnp.float32)
    seq = {k: v for k, v in batch.items() if k != "mask"}
    logp, ent = completion_logprobs(mdef, params, seq, mask.shape[-1], dtype=dtype, remat=remat, rng=rng,
                                    chunk_size=chunk_size)
    return -jnp.sum(logp * mask), jnp.sum(ent * mask), jnp.sum(mask)


def make_update(mdef, optimizer, cfg: SFTConfig):
    """update(state, frozen, batch, key) -> (state, metrics); batch leaves are [micro_batches, ...]."""
    dtype = jnp.dtype(cfg.compute_dtype)
    use_dropout = cfg.lora is not None and cfg.lora.dropout > 0

    def update(state, frozen, batch, key):
        params = state["params"]
        n_tok = jnp.maximum(jnp.sum(batch["mask"].astype(jnp.float32)), 1.0)

        def loss_of(prm, mb, k):
            full = lora_lib.combine(prm, frozen) if frozen else prm
            nll, ent, _ = completion_nll(mdef, full, mb, dtype=dtype, remat=cfg.remat,
                                         rng=k if use_dropout else None, chunk_size=cfg.vocab_chunk)
            return nll / n_tok, ent

        grad_fn = jax.value_and_grad(loss_of, has_aux=True)

        def body(carry, xs):
            g_acc, loss_acc, ent_acc = carry
            mb, i = xs
            (loss, ent), g = grad_fn(params["model"], mb, jax.random.fold_in(key, i))
            return (jax.tree.map(jnp.add, g_acc, g), loss_acc + loss, ent_acc + ent), None

        m = batch["mask"].shape[0]
        zeros = jax.tree.map(jnp.zeros_like, params["model"])
        (g_model, loss, ent), _ = jax.lax.scan(body, (zeros, jnp.float32(0), jnp.float32(0)),
                                               (batch, jnp.arange(m)))
        grads = {"model": g_model}
        updates, opt_state = optimizer.update(grads, state["opt_state"], params)
        new = dict(state, params=optax.apply_updates(params, updates), opt_state=opt_state, step=state["step"] + 1)
        return new, {"loss": loss, "mean_logp": -loss, "entropy": ent / n_tok, "tokens": n_tok,
                     "grad_norm": optax.tree.norm(grads)}

    return update


_STACKED_AXES = {"mask": ("batch", None)}


class StepIterator:
    """The SFT data iterator: yields step numbers; its state is the sample order's position."""

    def __init__(self, order: SampleOrder, start: int):
        self.order, self.step = order, start

    def __next__(self) -> int:
        self.step += 1
        return self.step - 1

    def get_state(self) -> dict:
        return self.order.state(self.step)


# ------------------------------------------------------------------ the trainer
class SFTTrainer(Trainer):
    """Config, data and step function; the rest is the trainer core."""

    desc = "sft-reasoner"

    def __init__(self, cfg: SFTConfig, workdir, *, mesh=None, abstract: bool = False):
        super().__init__(cfg, workdir, mesh=mesh, abstract=abstract)
        if cfg.batch_size % (cfg.micro_batches * self.process[1]):
            raise ConfigError(f"batch_size={cfg.batch_size} is not divisible by micro_batches={cfg.micro_batches} "
                              f"x {self.process[1]} data shards")
        if not abstract:
            self._read_data()
        handle = self.base = self.load_base(cfg.model, self._build_toy_base, masters=cfg.lora is None)
        if not abstract:
            self.tokenizer = load_tokenizer(self.source)
            self.image_processor = load_image_processor(self.source, handle.config)
            # the sampler's own prompt layout (generate mode, left padded)
            self.reasoner = Reasoner(handle, self.tokenizer, self.image_processor, input_config=cfg.inputs,
                                     max_prompt_tokens=cfg.max_prompt_tokens, buckets=self.buckets)
            self.eos_id = self.tokenizer.convert_tokens_to_ids(EOS_TOKEN)
            if self.eos_id is None or self.eos_id < 0 or self.eos_id == self.tokenizer.unk_token_id:
                raise UserError(f"the tokenizer in {self.source} has no {EOS_TOKEN} token")
            self._tokenize_completions()
            self.order = SampleOrder(len(self.samples), cfg.batch_size, cfg.seed)
        self.mdef = model_def(handle.model_config, cfg.lora)
        model, self.frozen, model_sh = self.split_params(self.mdef, handle.params, cfg.lora)
        if cfg.lora is None:
            handle.params = None  # trained from the fp32 copy; nothing reads the initial weights
        self.setup_state({"model": model}, {"model": model_sh}, self.total_steps())
        frozen_sh = jax.tree.map(lambda x: x.sharding, self.frozen)
        self.jit_update(make_update(self.mdef, self.optimizer, cfg), (frozen_sh,), batch_args=2)

    def _read_data(self):
        cfg = self.cfg
        toy = primary_first(lambda: toy_sft_files(self.workdir), "embedrl_sft_toy_data") if cfg.data.toy else []
        files = list(cfg.data.files) + toy
        if not files:
            raise ConfigError("data: no SFT files (set data.files, or data.toy=true)")
        self.samples, self.report = load_sft_samples(cfg.data, files)
        if not self.samples:
            raise UserError(f"data: no SFT samples in {files} ({self.report})")
        if self.report.skipped_total:
            log.warning("skipped bad SFT lines: %s", self.report)

    def _build_toy_base(self, path):
        corpus = [s.prompt["text"] for s in self.samples] + [s.completion for s in self.samples]
        build_tiny_base(path, seed=self.cfg.seed, corpus=corpus)

    def _tokenize_completions(self):
        texts = [s.completion for s in self.samples]
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        limit = self.cfg.max_completion_tokens
        self.completions, self.truncated = [], np.zeros(len(texts), bool)
        for i, row in enumerate(ids):
            row = list(row) + [self.eos_id]
            if len(row) > limit:
                self.truncated[i] = True
                row = row[:limit]
            self.completions.append(np.asarray(row, np.int32))
        self.report.truncated = int(self.truncated.sum())
        if self.report.truncated:
            log.warning("%d of %d completions are longer than max_completion_tokens=%d and were truncated",
                        self.report.truncated, len(texts), limit)

    # -- data
    def steps_per_epoch(self) -> float:
        return len(self.samples) / self.cfg.batch_size

    def data_iterator(self, start: int) -> StepIterator:
        return StepIterator(self.order, start)

    def check_resume(self, data_state: dict) -> None:
        n = int(data_state["iterator"].get("num_samples", self.order.n))
        if n != self.order.n:
            raise UserError(f"{self.workdir}: the checkpoint was trained on {n} samples, the data now has "
                            f"{self.order.n}; resuming would not be exact (use a new workdir)")

    def completion_length(self, indices) -> int:
        """The padded completion length T of a step: the bucketed longest completion, capped."""
        longest = max(len(self.completions[i]) for i in indices)
        return int(min(self.buckets.seq(longest), self.cfg.max_completion_tokens))

    def local_indices(self, step: int) -> np.ndarray:
        """This process's slice of the step's global sample indices."""
        idx = self.order.indices(step)
        p, n = self.process
        per = len(idx) // n
        return idx[p * per:(p + 1) * per]

    def host_batch(self, step: int) -> dict[str, np.ndarray]:
        """One step's samples -> micro-batch-stacked sequence arrays [M, R, P + T] and ``mask`` [M, R, T]."""
        cfg = self.cfg
        t = self.completion_length(self.order.indices(step))  # one T for every process
        idx = self.local_indices(step)
        size = len(idx) // cfg.micro_batches
        groups = [idx[i * size:(i + 1) * size] for i in range(cfg.micro_batches)]
        prepared = []
        for g in groups:
            try:
                prepared.append(self.reasoner.prepare([self.samples[i].prompt for i in g]))
            except (ValueError, RecordError) as e:
                raise UserError(f"samples {[self.samples[i].source for i in g]}: {e}") from None
        # every host packs its share alike: the global arrays are the hosts' rows side by side
        shape = hosts_shape(self.mdef.config, prepared, self.buckets, self.mesh)
        arrays, deltas = pack_prompts(self.mdef.config, prepared, self.buckets, shape=shape)
        seqs = []
        for a, d, g in zip(arrays, deltas, groups):
            tokens = np.zeros((len(g), t), np.int32)
            mask = np.zeros((len(g), t), np.int32)
            for r, i in enumerate(g):
                c = self.completions[i]
                tokens[r, :len(c)] = c
                mask[r, :len(c)] = 1
            s = with_completions(a, d, tokens, mask)
            s["mask"] = mask
            seqs.append(s)
        return {k: np.stack([s[k] for s in seqs]) for k in seqs[0]}

    def device_batch(self, arrays):
        """This host's [M, b, ...] micro-batches -> global arrays (the hosts' rows side by side)."""
        arrays = host_share(self.mdef.config, arrays, self.mesh, jax.process_index())
        return global_batch(self.mesh, arrays, {k: (None,) + (_STACKED_AXES.get(k) or BATCH_AXES[k]) for k in arrays})

    def train_step(self, step: int, index: int) -> dict:
        t0 = time.perf_counter()
        batch = self.device_batch(self.host_batch(index))
        with jax.set_mesh(self.mesh):
            self.state, metrics = self.update(self.state, self.frozen, batch,
                                              jax.random.fold_in(jax.random.key(self.cfg.seed), step))
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        dt = time.perf_counter() - t0
        return {"loss": metrics["loss"], "tokens": int(metrics["tokens"]), "mean_logp": metrics["mean_logp"],
                "entropy": metrics["entropy"], "grad_norm": metrics["grad_norm"], "step_s": dt,
                "samples_per_s": self.cfg.batch_size / dt,
                "truncated": int(self.truncated[self.order.indices(step)].sum()),
                "skipped": self.report.skipped_total}

    def abstract_update_args(self, *, samples: int, prompt: int, completion: int,
                             vision: tuple[int, int] | None = None) -> tuple:
        """(frozen, batch, key) of one step of `samples` samples (in micro_batches), prompts of
        `prompt` tokens, completions of `completion` tokens, `vision` (patch rows, row length)."""
        m = self.cfg.micro_batches
        spec = packed_spec(self.mdef.config, samples // m, prompt + completion, vision, lead=(m,))
        spec["mask"] = jax.ShapeDtypeStruct((m, samples // m, completion), np.int32)
        axes = {k: (None,) + (_STACKED_AXES.get(k) or BATCH_AXES[k]) for k in spec}
        return abstract_of(self.frozen), placed_spec(self.mesh, spec, axes), self.abstract_key()


def run_sft(cfg: SFTConfig, workdir, *, mesh=None, progress: bool = False) -> Path:
    """Run (or resume) SFT in `workdir` and export; returns the HF model dir (WORKDIR/export)."""
    trainer = SFTTrainer(cfg, workdir, mesh=mesh)
    trainer.run(progress=progress, export=True)
    return trainer.export_dir
