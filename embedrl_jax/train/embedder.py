"""train-embedder: LoRA (or full) contrastive training of the Embedder on one mesh.

The step function: GradCache-chunked symmetric InfoNCE over the global batch, clipping and
AdamW on fp32 master weights with the forward in `compute_dtype`. Data: the homogeneous mixture
sampler over MMEB / LLaVA-Hound records (or the bundled toy set) behind a grain iterator. Hook:
held-out Hit@1. Setup, loop, resume and export are the trainer core's (train/core.py).
"""
from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .. import lora as lora_lib
from ..data import pipeline, records as rec
from ..data.inputs import InputBuilder, InputConfig, load_image_processor, load_tokenizer
from ..data.toy import make_toy_retrieval
from ..embed.embedder import embed_rows
from ..embed.losses import grad_cache, info_nce, logit_scale_param
from ..errors import ConfigError, UserError
from ..fsutil import primary_first
from ..hf import BATCH_AXES
from ..lora import LoraConfig
from ..models.qwen3_vl.inputs import Buckets, host_share, hosts_shape, pack_chunks
from ..models.qwen3_vl.model import model_def
from ..sharding import global_batch, to_host
from ..toy.base import build_tiny_base, toy_corpus
from .abstract import abstract_of, packed_spec, placed_spec
from .core import Trainer, TrainerConfig
from .state import OptimConfig

__all__ = ["DataConfig", "EmbedderTrainConfig", "EmbedderTrainer", "embed_fn", "make_update", "read_data_file"]


@dataclasses.dataclass(frozen=True)
class DataConfig:
    toy: bool = True  # build the bundled toy retrieval set under WORKDIR/data
    mmeb: tuple[str, ...] = ()  # MMEB-train JSON/JSONL files
    llavahound: tuple[str, ...] = ()  # LLaVA-Hound video JSON files
    weights: dict[str, float] = dataclasses.field(default_factory=dict)  # dataset name -> weight (default 1)
    heldout: tuple[str, ...] = ()  # datasets for Hit@1 evaluation (toy: its held-out sets)
    sub_batch_size: int = 8
    sub_batches_per_batch: int = 1
    max_video_sub_batches: int = 1
    skip_bad: bool = False
    use_tcot: bool = True  # give the Embedder the T-CoT layout when records carry one
    # where relative media paths of the given files resolve (None: each file's own folder)
    image_root: str | None = None  # MMEB image paths, every file
    frames_root: str | None = None  # LLaVA-Hound frame paths, every file
    image_roots: dict[str, str] = dataclasses.field(default_factory=dict)  # per file (dataset name or path)
    frames_roots: dict[str, str] = dataclasses.field(default_factory=dict)  # per file (dataset name or path)


@dataclasses.dataclass(frozen=True)
class EmbedderTrainConfig(TrainerConfig):
    model: str = "tiny"  # HF or orbax directory, or "tiny" (a toy base built offline)
    lora: LoraConfig | None = LoraConfig()  # noqa: RUF009
    optim: OptimConfig = OptimConfig()  # noqa: RUF009
    data: DataConfig = DataConfig()  # noqa: RUF009
    inputs: InputConfig = InputConfig()  # noqa: RUF009
    # training shapes: large minimums make every step of a dataset share one compiled shape
    buckets: Buckets = Buckets(seq_min=128, patch_min=256, rows_min=8)  # noqa: RUF009
    grad_cache_chunks: int = 1
    logit_scale: float = 50.0
    learn_logit_scale: bool = False
    eval_pairs: int = 64

    def __post_init__(self):
        super().__post_init__()
        if self.grad_cache_chunks < 1:
            raise ConfigError(f"grad_cache_chunks must be >= 1, got {self.grad_cache_chunks}")
        if self.data.sub_batch_size < 1:
            raise ConfigError(f"data.sub_batch_size must be >= 1, got {self.data.sub_batch_size}")


def read_data_file(path, cfg: DataConfig, *, video: bool, roots: bool = True):
    """One MMEB (`video` false) or LLaVA-Hound file -> (records, SkipReport), its relative media
    under the configured roots (`roots` false: the file's own folder, as for the bundled toy set)."""
    image_root, frames_root = rec.file_roots(path, cfg) if roots else (None, None)
    if video:
        return rec.read_llavahound(path, frames_dir=frames_root, skip_bad=cfg.skip_bad)
    return rec.read_mmeb(path, image_root=image_root, skip_bad=cfg.skip_bad)


# ------------------------------------------------------------------ the step function
def embed_fn(mdef, token_id, dtype, remat, params, chunk, key=None):
    """[b, D] L2-normalised <emb> embeddings of one packed chunk (leading chunk axis of 1)."""
    batch = jax.tree.map(lambda x: x[0], chunk)
    return embed_rows(mdef, params, batch, token_id, dtype=dtype, remat=remat, rng=key)


def make_update(mdef, optimizer, cfg: EmbedderTrainConfig, token_id: int):
    """update(state, frozen, q_chunks, p_chunks, key) -> (state, metrics); pure and jit-able.

    state["params"] = {"model": trainable model params (LoRA adapters, or everything),
    and with a learnable logit scale "log_scale"}; `frozen` holds the base weights.
    """
    dtype = jnp.dtype(cfg.compute_dtype)
    fn = functools.partial(embed_fn, mdef, token_id, dtype, cfg.remat)
    use_dropout = cfg.lora is not None and cfg.lora.dropout > 0

    def update(state, frozen, q, p, key):
        params = state["params"]
        chunks = jax.tree.leaves(q)[0].shape[0]

        def f(prm, chunk, k=None):
            return fn(lora_lib.combine(prm, frozen) if frozen else prm, chunk, k)

        kw = dict(num_chunks=chunks, rng=key if use_dropout else None)
        if chunks == 1 and not cfg.learn_logit_scale:
            # one chunk: plain backprop through both towers (GradCache would run the forward twice)
            def loss_of(prm):
                # the keys GradCache would give its single chunk of each tower
                kq, kp = (None, None) if not use_dropout else (
                    jax.random.fold_in(jax.random.fold_in(key, t), 0) for t in (0, 1))
                qe = f(prm, jax.tree.map(lambda x: x[:1], q), kq)
                pe = f(prm, jax.tree.map(lambda x: x[:1], p), kp)
                return info_nce(qe, pe, scale=cfg.logit_scale)

            (loss, metrics), g_model = jax.value_and_grad(loss_of, has_aux=True)(params["model"])
            grads = {"model": g_model}
        elif cfg.learn_logit_scale:
            def loss_fn(qq, pp, log_scale):
                return info_nce(qq, pp, scale=logit_scale_param(log_scale))

            loss, (g_model, g_loss), metrics = grad_cache(
                f, params["model"], q, p, loss_fn=loss_fn, loss_params={"log_scale": params["log_scale"]}, **kw)
            grads = {"model": g_model, "log_scale": g_loss["log_scale"]}
        else:
            loss, g_model, metrics = grad_cache(f, params["model"], q, p, scale=cfg.logit_scale, **kw)
            grads = {"model": g_model}
        updates, opt_state = optimizer.update(grads, state["opt_state"], params)
        new = dict(state, params=optax.apply_updates(params, updates), opt_state=opt_state, step=state["step"] + 1)
        return new, dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads))

    return update


# ------------------------------------------------------------------ the trainer
class EmbedderTrainer(Trainer):
    """Config, data, step function and the Hit@1 hook; the rest is the trainer core."""

    desc = "train-embedder"

    def __init__(self, cfg: EmbedderTrainConfig, workdir, *, mesh=None, abstract: bool = False):
        super().__init__(cfg, workdir, mesh=mesh, abstract=abstract)
        handle = self.base = self.load_base(cfg.model, self._build_toy_base, masters=cfg.lora is None)
        if abstract:
            self.token_id = int((handle.model_config.emb_token_ids or (handle.model_config.text.vocab_size - 1,))[0])
        else:
            self.tokenizer = load_tokenizer(self.source, cfg.inputs.emb_token)
            self.token_id = int(self.tokenizer.convert_tokens_to_ids(cfg.inputs.emb_token))
            self.image_processor = load_image_processor(self.source, handle.config)
            self.builder = InputBuilder(self.tokenizer, self.image_processor, handle.config, cfg.inputs)
        if self.token_id >= handle.model_config.text.vocab_size:
            raise UserError(f"<emb> id {self.token_id} is outside the model's vocabulary ({handle.model_config.text.vocab_size})")
        self.mdef = mdef = model_def(handle.model_config.replace(emb_token_ids=(self.token_id,)), cfg.lora)
        # the Embedder never reads the LM head: with full fine-tuning it stays out of the optimizer
        # (no moments, no weight decay), as PyTorch's AdamW skips a parameter without a gradient
        model, self.frozen, model_sh = self.split_params(mdef, handle.params, cfg.lora, frozen_keys=("lm_head",))
        if cfg.lora is None:
            handle.params = None  # trained from the fp32 copy; the frozen LM head is kept in `frozen`
        trainable, shardings = {"model": model}, {"model": model_sh}
        if cfg.learn_logit_scale:
            trainable["log_scale"] = jnp.log(jnp.float32(cfg.logit_scale))
            shardings["log_scale"] = self.replicated
        if not abstract:
            self._build_data()
        self.setup_state(trainable, shardings, self.total_steps())
        frozen_sh = jax.tree.map(lambda x: x.sharding, self.frozen)
        self.jit_update(make_update(mdef, self.optimizer, cfg, self.token_id), (frozen_sh,), batch_args=3)

    def _build_toy_base(self, path):
        manifest = make_toy_retrieval(self.workdir / "data")
        build_tiny_base(path, seed=self.cfg.seed, corpus=toy_corpus(manifest) + [self.cfg.inputs.suffix])

    # -- data
    def _build_data(self):
        cfg = self.cfg.data
        sources, names, is_video, heldout, skipped = [], [], [], {}, {}
        mmeb, hound, toy = list(cfg.mmeb), list(cfg.llavahound), set()
        if cfg.toy:
            manifest = primary_first(lambda: make_toy_retrieval(self.workdir / "data"), "embedrl_toy_data")
            for name, d in manifest["datasets"].items():
                target = (mmeb if d["format"] == "mmeb" else hound) if d["split"] == "train" else None
                if target is not None:
                    target.append(d["path"])
                    toy.add(d["path"])  # the toy files keep their media next to them
                else:
                    heldout[name] = d
        for paths, video in ((mmeb, False), (hound, True)):
            for path in paths:
                records, report = self._read_file(path, video, roots=path not in toy)
                sources.append(records), names.append(Path(path).stem), is_video.append(video)
                skipped[Path(path).stem] = report.skipped
        if not sources:
            raise ConfigError("data: no training datasets (set data.toy=true or give data.mmeb / data.llavahound)")
        self.skipped, self.dataset_names, self.sources = skipped, names, sources
        self.sampler = pipeline.MixtureSampler.from_sources(
            sources, [cfg.weights.get(n, 1.0) for n in names], is_video, cfg.sub_batch_size,
            sub_batches_per_batch=cfg.sub_batches_per_batch, max_video_sub_batches=cfg.max_video_sub_batches,
            seed=self.cfg.seed,
        )
        self.eval_sets = {}
        for name in cfg.heldout or tuple(n for n, d in heldout.items() if not d.get("is_video")):
            if name in heldout:
                d = heldout[name]
                reader = rec.read_mmeb if d["format"] == "mmeb" else rec.read_llavahound
                self.eval_sets[name] = reader(d["path"])[0][: self.cfg.eval_pairs]
            else:
                self.eval_sets[Path(name).stem] = self._read_file(name, False)[0][: self.cfg.eval_pairs]

    def _read_file(self, path, video: bool, roots: bool = True):
        return read_data_file(path, self.cfg.data, video=video, roots=roots)

    def data_iterator(self, start_step: int):
        return pipeline.pair_iterator(self.sources, self.sampler, process_index=self.process[0],
                                      process_count=self.process[1], start_step=start_step)

    def steps_per_epoch(self) -> float:
        pairs = self.cfg.data.sub_batch_size * self.cfg.data.sub_batches_per_batch
        return sum(len(s) for s in self.sources) / pairs

    def host_batch(self, records):
        """One step's records -> (q chunks, p chunks) packed arrays [C, ...] for this host."""
        c = self.cfg.grad_cache_chunks
        if len(records) % c:
            raise ConfigError(f"batch of {len(records)} pairs is not divisible by grad_cache_chunks={c}")
        strip = (lambda it: it) if self.cfg.data.use_tcot else (lambda it: {k: v for k, v in it.items() if k != "tcot"})
        size, mcfg, buckets = len(records) // c, self.mdef.config, self.buckets
        out = []
        for side in ([strip(r.query) for r in records], [strip(r.positive) for r in records]):
            built = [self.builder.build(side[i * size:(i + 1) * size]) for i in range(c)]
            # every host packs its share alike: the global arrays are the hosts' rows side by side
            out.append(pack_chunks(mcfg, built, buckets, shape=hosts_shape(mcfg, built, buckets, self.mesh)))
        return tuple(out)

    def device_batch(self, arrays):
        """This host's [C, b, ...] chunks -> global arrays (the hosts' rows side by side per chunk)."""
        arrays = host_share(self.mdef.config, arrays, self.mesh, jax.process_index())
        return global_batch(self.mesh, arrays, {k: (None,) + BATCH_AXES[k] for k in arrays})

    def train_step(self, step: int, records) -> dict:
        t0 = time.perf_counter()
        q, p = (self.device_batch(x) for x in self.host_batch(records))
        with jax.set_mesh(self.mesh):
            self.state, metrics = self.update(self.state, self.frozen, q, p,
                                              jax.random.fold_in(jax.random.key(self.cfg.seed), step))
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        dt = time.perf_counter() - t0
        return {"loss": metrics.pop("loss"), "pairs_per_s": len(records) * self.process[1] / dt, "step_s": dt,
                **metrics}

    def abstract_update_args(self, *, pairs: int, seq: int, vision: tuple[int, int] | None = None) -> tuple:
        """(frozen, q, p, key) of one step of `pairs` pairs per side: `seq` tokens per item and
        `vision` = (patch rows, row length) per chunk, in grad_cache_chunks chunks."""
        c = self.cfg.grad_cache_chunks
        spec = packed_spec(self.mdef.config, pairs // c, seq, vision, lead=(c,))
        side = placed_spec(self.mesh, spec, {k: (None,) + BATCH_AXES[k] for k in spec})
        return abstract_of(self.frozen), side, side, self.abstract_key()

    # -- eval hook
    def embed_items(self, items, batch_size: int = 16) -> np.ndarray:
        fn, params, out = self._eval_fn(), self.model_params(), []
        for i in range(0, len(items), batch_size):
            arrays = pack_chunks(self.mdef.config, [self.builder.build(list(items[i:i + batch_size]))], self.buckets)
            with jax.set_mesh(self.mesh):
                out.append(to_host(fn(params, arrays)))  # every host evaluates; gathered across hosts
        return np.concatenate(out)

    @functools.cache
    def _eval_fn(self):
        return jax.jit(functools.partial(embed_fn, self.mdef, self.token_id, jnp.dtype(self.cfg.compute_dtype), "none"))

    def evaluate(self) -> dict[str, float]:
        """Hit@1 of query -> positive among the held-out pairs (chance = 1/N)."""
        out = {}
        for name, recs in self.eval_sets.items():
            q = self.embed_items([r.query for r in recs])
            p = self.embed_items([r.positive for r in recs])
            out[f"eval/{name}/hit1"] = float(np.mean(np.argmax(q @ p.T, axis=1) == np.arange(len(recs))))
            out[f"eval/{name}/chance"] = 1.0 / len(recs)
        return out

    def export_config(self) -> dict:
        return {"emb_token_ids": [self.token_id]}

