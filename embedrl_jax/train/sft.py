"""sft-reasoner: supervised cold start of the Reasoner on given T-CoTs.

The Reasoner learns to write ``<thinking>..{json}</thinking><rethink>..</rethink><answer>..</answer>``
completions before GRPO. Every sample is one prompt item (rendered exactly as the sampler renders
it: `Reasoner.prepare`, generate mode, left padded) and one completion (its tokens, then
``<|im_end|>``). The loss is the token-mean negative log-likelihood of the completion tokens,
computed by `reason.sequences.completion_logprobs`, the same function GRPO scores rollouts with.

One jitted, donated `update(state, frozen, batch, key)` walks the step's micro-batches (stacked
on a leading axis by `pack_prompts`, so a step has one static shape), sums gradients, divides by
the step's completion-token count, clips and applies AdamW on fp32 master weights. The host loop
owns the data order (a pure function of the step: one permutation per epoch from (seed, epoch)),
checkpoints (train state + data position, exact resume), metrics and the HF export.

Data: JSONL files, each line one of
  (a) ``{"prompt": str, "completion": str, "images": [paths]?, "video": [frame paths]?}``:
      ``prompt`` is the rendered user text; relative media paths resolve against the file's folder;
  (b) an MMEB-train record (it has ``qry``): up to two samples, the query side with ``query_cot``
      and the positive side with ``pos_cot``, prompts from `prompts.reasoner_prompt`. A side without
      a T-CoT gives no sample (counted as ``no_tcot``; failed syntheses have empty CoTs).
Bad lines raise `RecordError` naming the file and line, or are skipped and counted with
``data.skip_bad``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..config import to_dict
from ..data.inputs import InputConfig
from ..data.records import RecordError
from ..fsutil import primary_first, write_run_config
from ..lora import LoraConfig
from ..models.qwen3_vl.inputs import Buckets
from ..reason.reasoner import GENERATE_INPUTS
from ..sharding import MeshConfig
from .state import OptimConfig

__all__ = ["SFTConfig", "SFTDataConfig", "SFTDataReport", "SFTSample", "SFTTrainer", "SampleOrder",
           "completion_nll", "load_sft_samples", "make_update", "run_sft", "toy_sft_files"]

log = logging.getLogger(__name__)

EOS_TOKEN = "<|im_end|>"


@dataclasses.dataclass(frozen=True)
class SFTDataConfig:
    files: tuple[str, ...] = ()  # JSONL files of SFT samples ((a) prompt/completion or (b) MMEB records)
    prompts: str | None = None  # prompt templates for MMEB records (None: the packaged defaults)
    skip_bad: bool = False  # skip and count bad lines instead of failing
    toy: bool = False  # also train on the T-CoTs of the bundled toy retrieval set (built under WORKDIR/data)


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    model: str = "tiny"  # HF dir (config.json, safetensors, tokenizer) or orbax dir (params/); "tiny": a toy base built offline
    data: SFTDataConfig = SFTDataConfig()
    lora: LoraConfig | None = None  # None: full fine-tuning
    # frozen dataclasses, so shared defaults are safe
    optim: OptimConfig = OptimConfig(lr=1e-5, warmup_steps=10, weight_decay=0.0)  # noqa: RUF009
    inputs: InputConfig = GENERATE_INPUTS
    mesh: MeshConfig = MeshConfig()  # noqa: RUF009
    # prompt lengths, completion lengths and patch rows are bucketed (static shapes)
    buckets: Buckets = Buckets(seq_min=64, patch_min=64, rows_min=4)  # noqa: RUF009
    batch_size: int = 8  # samples per step (global)
    micro_batches: int = 1  # the step's samples in this many stacked micro-batches (gradient accumulation)
    max_completion_tokens: int = 1024  # completion tokens (EOS included) kept; longer ones are truncated
    max_prompt_tokens: int = 16384
    steps: int = 100
    seed: int = 0
    compute_dtype: str = "bfloat16"
    base_dtype: str = "float32"  # frozen base weights with LoRA (full fine-tuning keeps fp32 masters)
    remat: bool = False
    vocab_chunk: int = 4096  # log-probs walk the vocabulary in chunks of this size
    checkpoint_every: int = 50
    keep_checkpoints: int = 3
    async_checkpoints: bool = True
    export_every: int = 0  # also export WORKDIR/model every this many steps (0: only at the end)


# ------------------------------------------------------------------ data
@dataclasses.dataclass(frozen=True)
class SFTSample:
    prompt: dict  # Reasoner prompt item: {"text", "images"?, "video"?}
    completion: str
    source: str  # "file: line N" (and the side for MMEB records)


@dataclasses.dataclass
class SFTDataReport:
    """What the readers kept: samples, skipped bad lines (by reason), MMEB sides without a T-CoT."""

    samples: int = 0
    lines: int = 0
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)
    examples: list[str] = dataclasses.field(default_factory=list)
    no_tcot: int = 0
    truncated: int = 0  # completions longer than max_completion_tokens (filled in by the trainer)

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())

    def add(self, err: RecordError) -> None:
        n = self.skipped.get(err.reason, 0)
        self.skipped[err.reason] = n + 1
        if n < 3:
            self.examples.append(str(err))

    def __str__(self) -> str:
        out = f"{self.samples} samples from {self.lines} lines"
        if self.skipped:
            out += ", skipped " + ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items()))
        if self.no_tcot:
            out += f", {self.no_tcot} MMEB sides without a T-CoT"
        if self.truncated:
            out += f", {self.truncated} completions truncated"
        return out


def _bad(path, where: str, msg: str, reason: str, field: str | None = None) -> RecordError:
    err = RecordError(f"{where}: {msg}", source=os.fspath(path), reason=reason)
    err.field = field
    return err


def _media_paths(raw, key, path, where, base) -> list[str]:
    v = raw.get(key)
    if v is None:
        return []
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(p, str) for p in v):
        raise _bad(path, where, f"field {key!r}: expected a list of paths", "bad_field", key)
    out = []
    for p in v:
        full = os.path.normpath(p if os.path.isabs(p) else os.path.join(base, os.path.expanduser(p)))
        if not os.path.isfile(full):
            raise _bad(path, where, f"field {key!r}: image file not found: {full}", "missing_image", key)
        out.append(full)
    return out


def _plain_sample(raw: dict, path, where: str, base: str) -> SFTSample:
    prompt = raw.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise _bad(path, where, "field 'prompt': expected a non-empty string", "missing_prompt", "prompt")
    if "completion" not in raw or raw["completion"] is None:
        raise _bad(path, where, "field 'completion' is missing", "missing_completion", "completion")
    completion = raw["completion"]
    if not isinstance(completion, str):
        raise _bad(path, where, f"field 'completion': expected a string, got {type(completion).__name__}",
                   "bad_field", "completion")
    if not completion.strip():
        raise _bad(path, where, "field 'completion' is empty", "empty_completion", "completion")
    item: dict[str, Any] = {"text": prompt}
    images = _media_paths(raw, "images", path, where, base)
    video = _media_paths(raw, "video", path, where, base)
    if images:
        item["images"] = images
    if video:
        item["video"] = video
    return SFTSample(item, completion.strip(), f"{path}: {where}")


def _mmeb_samples(path, entries, cfg: SFTDataConfig, prompts, report: SFTDataReport) -> dict[int, list[SFTSample]]:
    """MMEB lines of one file -> {entry index: samples}, read by `read_mmeb` (entries: [(where, record)])."""
    from ..data.records import read_mmeb
    from ..prompts import reasoner_prompt

    path = os.fspath(path)
    with tempfile.TemporaryDirectory(prefix="embedrl-sft-") as d:
        tmp = os.path.join(d, "mmeb.jsonl")  # read_mmeb reads files: the MMEB lines of a mixed file, in order
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(raw, ensure_ascii=False) + "\n" for _, raw in entries)

        def relabel(msg: str) -> str:  # "<tmp>: record k: ..." -> "<path>: line N: ..."
            m = re.match(re.escape(tmp) + r": record (\d+)", msg)
            return f"{path}: {entries[int(m.group(1))][0]}{msg[m.end():]}" if m else msg.replace(tmp, path)

        try:
            records, rep = read_mmeb(tmp, dataset="sft", skip_bad=cfg.skip_bad, negatives=False,
                                     image_root=os.path.dirname(os.path.abspath(path)))
        except RecordError as e:
            err = RecordError(relabel(str(e)), reason=e.reason)
            err.field, err.file = e.field, e.file
            raise err from None
        for reason, n in rep.counts.items():
            report.skipped[reason] = report.skipped.get(reason, 0) + n
        report.examples += [relabel(x) for x in rep.examples]
    out: dict[int, list[SFTSample]] = {}
    for rec in records:
        k = int(rec.key.rsplit("/", 1)[1])
        where = entries[k][0]
        for side, item in (("query", rec.query), ("positive", rec.positive)):
            tcot = item.get("tcot")
            if not tcot:
                report.no_tcot += 1
                continue
            plain = {key: v for key, v in item.items() if key != "tcot"}
            out.setdefault(k, []).append(
                SFTSample(reasoner_prompt(plain, side, prompts), tcot, f"{path}: {where} ({side})"))
    return out


def load_sft_samples(cfg: SFTDataConfig, files=None) -> tuple[list[SFTSample], SFTDataReport]:
    """Read the SFT files (`files` overrides `cfg.files`) into samples, in file and line order."""
    from ..prompts import load_prompts

    prompts = load_prompts(cfg.prompts)
    report = SFTDataReport()
    samples: list[SFTSample] = []
    for path in (cfg.files if files is None else files):
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"data file {path}: no such file")
        base = os.path.dirname(os.path.abspath(path))
        mmeb: list[tuple[str, dict]] = []
        plain: list[tuple[int, SFTSample | None]] = []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                report.lines += 1
                where = f"line {lineno}"
                try:
                    try:
                        raw = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise _bad(path, where, f"not valid JSON: {e}", "bad_json") from None
                    if not isinstance(raw, dict):
                        raise _bad(path, where, f"expected a JSON object, got {type(raw).__name__}", "bad_record")
                    if "qry" in raw:
                        mmeb.append((where, raw))
                        plain.append((len(mmeb) - 1, None))
                    elif "prompt" in raw or "completion" in raw:
                        plain.append((-1, _plain_sample(raw, path, where, base)))
                    else:
                        raise _bad(path, where, "neither an SFT sample ('prompt', 'completion') nor an MMEB "
                                   "record ('qry')", "bad_record")
                except RecordError as e:
                    if not cfg.skip_bad:
                        raise
                    report.add(e)
        # keep file order: MMEB records are read together, then put back in their places
        by_entry = _mmeb_samples(path, mmeb, cfg, prompts, report) if mmeb else {}
        for k, s in plain:
            samples.extend(by_entry.get(k, []) if s is None else [s])
    report.samples = len(samples)
    return samples, report


def toy_sft_files(workdir) -> list[str]:
    """The MMEB train files of the bundled toy retrieval set (built under WORKDIR/data)."""
    from ..data.toy import make_toy_retrieval

    manifest = make_toy_retrieval(Path(workdir) / "data")
    return [d["path"] for d in manifest["datasets"].values() if d["format"] == "mmeb" and d["split"] == "train"]


class SampleOrder:
    """Which samples a step trains on: a pure function of (seed, step).

    Sample positions run through an endless stream of epochs, each one permutation of the N
    samples drawn from ``np.random.default_rng([seed, epoch])``; step s takes positions
    s*B .. s*B + B - 1. The data iterator state is therefore just the step.
    """

    def __init__(self, n: int, batch_size: int, seed: int):
        if n < 1:
            raise ValueError("no SFT samples")
        self.n, self.batch_size, self.seed = int(n), int(batch_size), int(seed)
        self._perms: dict[int, np.ndarray] = {}

    def permutation(self, epoch: int) -> np.ndarray:
        epoch = int(epoch)
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.clear()
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return self._perms[epoch]

    def indices(self, step: int) -> np.ndarray:
        pos = np.arange(step * self.batch_size, (step + 1) * self.batch_size)
        return np.array([self.permutation(int(p // self.n))[int(p % self.n)] for p in pos], np.int64)

    def state(self, step: int) -> dict:
        pos = step * self.batch_size
        return {"step": int(step), "epoch": int(pos // self.n), "offset": int(pos % self.n), "num_samples": self.n}


# ------------------------------------------------------------------ the jitted step
def completion_nll(mdef, params, batch, *, dtype=jnp.float32, remat=False, rng=None, chunk_size=4096):
    """(-sum logp, sum entropy, token count) over the completion tokens of one micro-batch.

    `batch` holds `with_completions` arrays [R, P + T] and ``mask`` [R, T] (1 for completion
    tokens, EOS included).
    """
    from ..reason.sequences import completion_logprobs

    mask = batch["mask"].astype(jnp.float32)
    seq = {k: v for k, v in batch.items() if k != "mask"}
    logp, ent = completion_logprobs(mdef, params, seq, mask.shape[-1], dtype=dtype, remat=remat, rng=rng,
                                    chunk_size=chunk_size)
    return -jnp.sum(logp * mask), jnp.sum(ent * mask), jnp.sum(mask)


def make_update(mdef, optimizer, cfg: SFTConfig):
    """update(state, frozen, batch, key) -> (state, metrics); batch leaves are [micro_batches, ...]."""
    import optax

    from .. import lora as lora_lib

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


# ------------------------------------------------------------------ host side
class SFTTrainer:
    """Builds model, data and the jitted step from a config; runs (or resumes) SFT in WORKDIR."""

    def __init__(self, cfg: SFTConfig, workdir, *, mesh=None):
        from .. import lora as lora_lib
        from ..checkpoint import load_model
        from ..embed.embedder import load_image_processor
        from ..hf import param_shardings
        from ..models.qwen3_vl.model import init_adapters, model_def
        from ..reason.reasoner import Reasoner
        from ..sharding import make_mesh
        from .state import make_optimizer, place_state

        self.cfg = cfg
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._check_config()
        write_run_config(self.workdir, to_dict(cfg))
        self.mesh = mesh or make_mesh(cfg.mesh)
        self.process = (jax.process_index(), jax.process_count())
        if cfg.batch_size % (cfg.micro_batches * self.process[1]):
            raise ValueError(f"batch_size={cfg.batch_size} is not divisible by micro_batches={cfg.micro_batches} "
                             f"x {self.process[1]} processes")

        toy = primary_first(lambda: toy_sft_files(self.workdir), "embedrl_sft_toy_data") if cfg.data.toy else []
        files = list(cfg.data.files) + toy
        if not files:
            raise ValueError("data: no SFT files (set data.files, or data.toy=true)")
        self.samples, self.report = load_sft_samples(cfg.data, files)
        if not self.samples:
            raise ValueError(f"data: no SFT samples in {files} ({self.report})")
        if self.report.skipped_total:
            log.warning("skipped bad SFT lines: %s", self.report)

        self.model_dir = self._model_dir()
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir))
        handle = load_model(self.model_dir, mesh=self.mesh, dtype=cfg.base_dtype)
        self.base = handle
        self.image_processor = load_image_processor(self.model_dir, handle.config)
        # the sampler's own prompt layout (generate mode, left padded)
        self.reasoner = Reasoner(handle, self.tokenizer, self.image_processor, input_config=cfg.inputs,
                                 max_prompt_tokens=cfg.max_prompt_tokens, buckets=cfg.buckets)
        self.eos_id = self.tokenizer.convert_tokens_to_ids(EOS_TOKEN)
        if self.eos_id is None or self.eos_id < 0 or self.eos_id == self.tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer in {self.model_dir} has no {EOS_TOKEN} token")
        self._tokenize_completions()

        self.mdef = model_def(handle.model_config, cfg.lora)
        key = jax.random.key(cfg.seed)
        shardings = param_shardings(self.mdef, self.mesh)
        if cfg.lora is not None:
            trainable = init_adapters(self.mdef, jax.random.fold_in(key, 1), shardings)
            self.frozen = handle.params
            self.trainable_shardings = {"model": lora_lib.split(shardings)[0]}
        else:
            trainable = jax.tree.map(lambda x: x.astype(jnp.float32), handle.params)
            self.frozen = {}
            self.trainable_shardings = {"model": shardings}
        self.frozen_shardings = jax.tree.map(lambda x: x.sharding, self.frozen)
        self.replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        self.optimizer = make_optimizer(cfg.optim, cfg.steps)
        self.state, self.state_shardings, self.state_shapes = place_state(
            {"model": trainable}, self.optimizer, self.trainable_shardings, self.mesh)
        self.order = SampleOrder(len(self.samples), cfg.batch_size, cfg.seed)
        self._update = jax.jit(
            make_update(self.mdef, self.optimizer, cfg),
            in_shardings=(self.state_shardings, self.frozen_shardings, None, None),  # batches arrive placed
            out_shardings=(self.state_shardings, self.replicated),
            donate_argnums=(0,),
        )

    def _check_config(self):
        cfg = self.cfg
        for name in ("batch_size", "micro_batches", "max_completion_tokens", "max_prompt_tokens", "vocab_chunk",
                     "checkpoint_every"):
            if getattr(cfg, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)}")
        if cfg.export_every < 0:
            raise ValueError(f"export_every must be >= 0, got {cfg.export_every}")

    # -- model source
    def _model_dir(self) -> Path:
        if self.cfg.model != "tiny":
            path = Path(self.cfg.model)
            if not (path / "config.json").exists():
                raise FileNotFoundError(f"model {path}: no config.json")
            return path
        path = self.workdir / "tiny_base"

        def build():
            if not (path / "config.json").exists():
                from .embedder import build_tiny_base

                corpus = [s.prompt["text"] for s in self.samples] + [s.completion for s in self.samples]
                build_tiny_base(path, seed=self.cfg.seed, corpus=corpus)

        primary_first(build, "embedrl_sft_tiny_base")
        return path

    # -- data
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

    def completion_length(self, indices) -> int:
        """The padded completion length T of a step: the bucketed longest completion, capped."""
        longest = max(len(self.completions[i]) for i in indices)
        return int(min(self.cfg.buckets.seq(longest), self.cfg.max_completion_tokens))

    def local_indices(self, step: int) -> np.ndarray:
        """This process's slice of the step's global sample indices."""
        idx = self.order.indices(step)
        p, n = self.process
        per = len(idx) // n
        return idx[p * per:(p + 1) * per]

    def host_batch(self, step: int) -> dict[str, np.ndarray]:
        """One step's samples -> micro-batch-stacked sequence arrays [M, R, P + T] and ``mask`` [M, R, T]."""
        from ..models.qwen3_vl.inputs import hosts_shape
        from ..reason.sequences import pack_prompts, with_completions

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
                raise ValueError(f"samples {[self.samples[i].source for i in g]}: {e}") from None
        # every host packs its share alike: the global arrays are the hosts' rows side by side
        shape = hosts_shape(self.mdef.config, prepared, cfg.buckets, self.mesh)
        arrays, deltas = pack_prompts(self.mdef.config, prepared, cfg.buckets, shape=shape)
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
        from ..hf import BATCH_AXES
        from ..models.qwen3_vl.inputs import host_share
        from ..sharding import global_batch

        arrays = host_share(self.mdef.config, arrays, self.mesh, jax.process_index())
        return global_batch(self.mesh, arrays, {k: (None,) + (_STACKED_AXES.get(k) or BATCH_AXES[k]) for k in arrays})

    def model_params(self):
        from .. import lora as lora_lib

        model = self.state["params"]["model"]
        return lora_lib.combine(model, self.frozen) if self.frozen else model

    # -- loop
    def run(self, steps: int | None = None, *, progress: bool = True, export: bool = True) -> dict:
        """Train (resuming from WORKDIR/checkpoints) until `steps` (default cfg.steps); returns the
        last metrics row. With `export`, WORKDIR/model is written at the end."""
        from tqdm import tqdm

        from .checkpoint import TrainCheckpointer
        from .metrics import MetricsWriter
        from .state import schedule

        cfg = self.cfg
        total = cfg.steps if steps is None else steps
        ckpt = TrainCheckpointer(self.workdir / "checkpoints", max_to_keep=cfg.keep_checkpoints,
                                 async_save=cfg.async_checkpoints)
        restored, data_state = ckpt.restore_latest(self.state_shapes, self.state_shardings)
        start = 0
        if restored is not None:
            self.state, start = restored, int(data_state["step"])
            if int(data_state.get("num_samples", self.order.n)) != self.order.n:
                ckpt.close()
                raise ValueError(f"{self.workdir}: the checkpoint was trained on {data_state['num_samples']} samples, "
                                 f"the data now has {self.order.n}; resuming would not be exact (use a new workdir)")
        writer = MetricsWriter(self.workdir / "metrics.jsonl", resume_step=start, enabled=self.process[0] == 0)
        lr_fn = schedule(cfg.optim, cfg.steps)
        base_key = jax.random.key(cfg.seed)
        bar = tqdm(range(start, total), initial=start, total=total, disable=not progress, desc="sft-reasoner")
        last = {}
        try:
            for step in bar:
                t0 = time.perf_counter()
                batch = self.device_batch(self.host_batch(step))
                with jax.set_mesh(self.mesh):
                    self.state, metrics = self._update(self.state, self.frozen, batch, jax.random.fold_in(base_key, step))
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                dt = time.perf_counter() - t0
                row = {"step": step + 1, "loss": metrics["loss"], "lr": float(lr_fn(step)),
                       "tokens": int(metrics["tokens"]), "mean_logp": metrics["mean_logp"],
                       "entropy": metrics["entropy"], "grad_norm": metrics["grad_norm"], "step_s": dt,
                       "samples_per_s": cfg.batch_size / dt,
                       "truncated": int(self.truncated[self.order.indices(step)].sum()),
                       "skipped": self.report.skipped_total}
                writer.write(row)
                last = row
                bar.set_postfix(loss=f"{row['loss']:.3f}")
                if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == total:
                    ckpt.save(step + 1, self.state, self.order.state(step + 1), force=True)
                if cfg.export_every and (step + 1) % cfg.export_every == 0 and step + 1 != total:
                    self.export()
        finally:
            ckpt.close()
            writer.close()
        if export and (last or not (self.workdir / "model" / "config.json").exists()):
            self.export()
        return last

    def export(self, out_dir=None, *, overwrite: bool = True) -> Path:
        """HF directory (LoRA merged in; config.json, safetensors, tokenizer, preprocessor_config.json)
        loadable by `Reasoner.from_pretrained`, written to a temporary sibling and renamed into place."""
        from ..hf import Qwen3VLHandle, save_hf

        out = Path(out_dir) if out_dir is not None else self.workdir / "model"
        mdef, merged = self.mdef.merged(self.model_params())
        handle = Qwen3VLHandle(self.base.config, mdef, merged, self.mesh, source=self.model_dir,
                               source_dtypes=self.base.source_dtypes)

        def processors(tmp: Path):
            self.tokenizer.save_pretrained(tmp)
            if not (tmp / "preprocessor_config.json").exists():
                self.image_processor.save_pretrained(tmp)

        return save_hf(handle, out, overwrite=overwrite, write_extra=processors)


def run_sft(cfg: SFTConfig, workdir, *, mesh=None, progress: bool = False) -> Path:
    """Run (or resume) SFT in `workdir` and export; returns the HF model dir (WORKDIR/model)."""
    trainer = SFTTrainer(cfg, workdir, mesh=mesh)
    trainer.run(progress=progress, export=True)
    return Path(workdir) / "model"
