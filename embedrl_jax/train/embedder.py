"""train-embedder: LoRA (or full) contrastive training of the Embedder on one mesh.

One jitted, donated `update(state, frozen, q, p, key)` does GradCache-chunked symmetric
InfoNCE over the global batch, clipping and AdamW on fp32 master weights with the forward
in `compute_dtype`. The host loop owns data, checkpoints and metrics only.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import shutil
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from ..config import to_dict
from ..data.inputs import InputConfig
from ..fsutil import primary_first, write_run_config
from ..lora import LoraConfig
from ..models.qwen3_vl.inputs import Buckets
from ..sharding import MeshConfig, to_host
from .state import OptimConfig


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


@dataclasses.dataclass(frozen=True)
class EmbedderTrainConfig:
    model: str = "tiny"  # HF directory (config.json, safetensors, tokenizer) or "tiny" (a toy model built offline)
    lora: LoraConfig | None = LoraConfig()
    optim: OptimConfig = OptimConfig()
    data: DataConfig = DataConfig()
    inputs: InputConfig = InputConfig()
    mesh: MeshConfig = MeshConfig()
    # training shapes: large minimums make every step of a dataset share one compiled shape
    buckets: Buckets = Buckets(seq_min=128, patch_min=256, rows_min=8)
    steps: int = 100
    seed: int = 0
    compute_dtype: str = "bfloat16"
    base_dtype: str = "float32"
    grad_cache_chunks: int = 1
    logit_scale: float = 50.0
    learn_logit_scale: bool = False
    remat: bool = False
    checkpoint_every: int = 50
    keep_checkpoints: int = 3
    async_checkpoints: bool = True
    eval_every: int = 0
    eval_pairs: int = 64


# ------------------------------------------------------------------ the jitted step
def embed_fn(mdef, token_id, dtype, remat, params, chunk, key=None):
    """[b, D] L2-normalised <emb> embeddings of one packed chunk (leading chunk axis of 1)."""
    from ..embed.embedder import embed_rows

    batch = jax.tree.map(lambda x: x[0], chunk)
    return embed_rows(mdef, params, batch, token_id, dtype=dtype, remat=remat, rng=key)


def make_update(mdef, optimizer, cfg: EmbedderTrainConfig, token_id: int):
    """update(state, frozen, q_chunks, p_chunks, key) -> (state, metrics); pure and jit-able.

    state["params"] = {"model": trainable model params (LoRA adapters, or everything),
    and with a learnable logit scale "log_scale"}; `frozen` holds the base weights.
    """
    import optax

    from .. import lora as lora_lib
    from ..embed.losses import grad_cache, info_nce, logit_scale_param

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


# ------------------------------------------------------------------ host side
class EmbedderTrainer:
    """Builds everything from a config and runs (or resumes) training in WORKDIR."""

    def __init__(self, cfg: EmbedderTrainConfig, workdir, *, mesh=None):
        from .. import lora as lora_lib
        from ..checkpoint import load_model
        from ..data.inputs import InputBuilder
        from ..embed.embedder import load_image_processor, load_tokenizer
        from ..hf import param_shardings
        from ..models.qwen3_vl.model import init_adapters, model_def
        from ..sharding import make_mesh
        from .state import make_optimizer, place_state

        self.cfg = cfg
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        write_run_config(self.workdir, to_dict(cfg))
        self.mesh = mesh or make_mesh(cfg.mesh)
        model_dir = self._model_dir()
        self.tokenizer = load_tokenizer(model_dir, cfg.inputs.emb_token)
        self.token_id = int(self.tokenizer.convert_tokens_to_ids(cfg.inputs.emb_token))
        handle = load_model(model_dir, mesh=self.mesh, dtype=cfg.base_dtype)
        if self.token_id >= handle.model_config.text.vocab_size:
            raise ValueError(f"<emb> id {self.token_id} is outside the model's vocabulary ({handle.model_config.text.vocab_size})")
        self.base = handle
        self.builder = InputBuilder(self.tokenizer, load_image_processor(model_dir, handle.config), handle.config, cfg.inputs)
        self.model_dir = model_dir
        self.mdef = model_def(handle.model_config.replace(emb_token_ids=(self.token_id,)), cfg.lora)
        key = jax.random.key(cfg.seed)
        shardings = param_shardings(self.mdef, self.mesh)
        if cfg.lora is not None:
            trainable = init_adapters(self.mdef, jax.random.fold_in(key, 1), shardings)
            frozen = handle.params
        else:
            # the Embedder never reads the LM head: keep it out of the optimizer (no moments, no
            # weight decay), as PyTorch's AdamW skips a parameter without a gradient
            trainable = jax.tree.map(lambda x: x.astype(jnp.float32),
                                     {k: v for k, v in handle.params.items() if k != "lm_head"})
            frozen = {k: v for k, v in handle.params.items() if k == "lm_head"}
        self.frozen = frozen
        self.frozen_shardings = jax.tree.map(lambda x: x.sharding, frozen)
        self.replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        self.trainable_shardings = {"model": lora_lib.split(shardings)[0] if cfg.lora is not None
                                    else {k: v for k, v in shardings.items() if k != "lm_head"}}
        trainable = {"model": trainable}
        if cfg.learn_logit_scale:
            trainable["log_scale"] = jnp.log(jnp.float32(cfg.logit_scale))
            self.trainable_shardings["log_scale"] = self.replicated
        self.optimizer = make_optimizer(cfg.optim, cfg.steps)
        self._build_data()
        self.state, self.state_shardings, self.state_shapes = place_state(
            trainable, self.optimizer, self.trainable_shardings, self.mesh)
        self._update = jax.jit(
            make_update(self.mdef, self.optimizer, cfg, self.token_id),
            in_shardings=(self.state_shardings, self.frozen_shardings, None, None, None),  # batches arrive placed
            out_shardings=(self.state_shardings, self.replicated),
            donate_argnums=(0,),
        )

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
                from ..data.toy import make_toy_retrieval

                manifest = make_toy_retrieval(self.workdir / "data")
                build_tiny_base(path, seed=self.cfg.seed, corpus=toy_corpus(manifest) + [self.cfg.inputs.suffix])

        primary_first(build, "embedrl_tiny_base")
        return path

    # -- data
    def _build_data(self):
        from ..data import pipeline, records as rec
        from ..data.toy import make_toy_retrieval

        cfg = self.cfg.data
        sources, names, is_video = [], [], []
        heldout = {}
        mmeb, hound = list(cfg.mmeb), list(cfg.llavahound)
        if cfg.toy:
            manifest = primary_first(lambda: make_toy_retrieval(self.workdir / "data"), "embedrl_toy_data")
            for name, d in manifest["datasets"].items():
                target = (mmeb if d["format"] == "mmeb" else hound) if d["split"] == "train" else None
                if target is not None:
                    target.append(d["path"])
                else:
                    heldout[name] = d
        skipped = {}
        for path in mmeb:
            records, report = rec.read_mmeb(path, skip_bad=cfg.skip_bad)
            sources.append(records), names.append(Path(path).stem), is_video.append(False)
            skipped[Path(path).stem] = report.skipped
        for path in hound:
            records, report = rec.read_llavahound(path, skip_bad=cfg.skip_bad)
            sources.append(records), names.append(Path(path).stem), is_video.append(True)
            skipped[Path(path).stem] = report.skipped
        if not sources:
            raise ValueError("data: no training datasets (set data.toy=true or give data.mmeb / data.llavahound)")
        self.skipped = skipped
        self.dataset_names = names
        weights = [cfg.weights.get(n, 1.0) for n in names]
        self.sampler = pipeline.MixtureSampler.from_sources(
            sources, weights, is_video, cfg.sub_batch_size,
            sub_batches_per_batch=cfg.sub_batches_per_batch, max_video_sub_batches=cfg.max_video_sub_batches,
            seed=self.cfg.seed,
        )
        self.sources = sources
        self.process = (jax.process_index(), jax.process_count())
        self.eval_sets = {}
        wanted = cfg.heldout or tuple(n for n, d in heldout.items() if not d.get("is_video"))
        for name in wanted:
            if name in heldout:
                d = heldout[name]
                reader = rec.read_mmeb if d["format"] == "mmeb" else rec.read_llavahound
                self.eval_sets[name] = reader(d["path"])[0][: self.cfg.eval_pairs]
            else:
                self.eval_sets[Path(name).stem] = rec.read_mmeb(name)[0][: self.cfg.eval_pairs]

    def _iterator(self, start_step: int):
        from ..data import pipeline

        return pipeline.pair_iterator(self.sources, self.sampler, process_index=self.process[0],
                                      process_count=self.process[1], start_step=start_step)

    def host_batch(self, records):
        """One step's records -> (q chunks, p chunks) packed arrays [C, ...] for this host."""
        from ..models.qwen3_vl.inputs import hosts_shape, pack_chunks

        c = self.cfg.grad_cache_chunks
        if len(records) % c:
            raise ValueError(f"batch of {len(records)} pairs is not divisible by grad_cache_chunks={c}")
        use_tcot = self.cfg.data.use_tcot
        strip = (lambda it: it) if use_tcot else (lambda it: {k: v for k, v in it.items() if k != "tcot"})
        qs = [strip(r.query) for r in records]
        ps = [strip(r.positive) for r in records]
        size = len(records) // c
        cfg = self.mdef.config
        buckets = self.cfg.buckets
        out = []
        for side in (qs, ps):
            built = [self.builder.build(side[i * size:(i + 1) * size]) for i in range(c)]
            # every host packs its share alike: the global arrays are the hosts' rows side by side
            out.append(pack_chunks(cfg, built, buckets, shape=hosts_shape(cfg, built, buckets, self.mesh)))
        return tuple(out)

    def device_batch(self, arrays):
        """This host's [C, b, ...] chunks -> global arrays (the hosts' rows side by side per chunk)."""
        from ..hf import BATCH_AXES
        from ..models.qwen3_vl.inputs import host_share
        from ..sharding import global_batch

        arrays = host_share(self.mdef.config, arrays, self.mesh, jax.process_index())
        return global_batch(self.mesh, arrays, {k: (None,) + BATCH_AXES[k] for k in arrays})

    # -- eval
    def embed_items(self, items, batch_size: int = 16) -> np.ndarray:
        from ..models.qwen3_vl.inputs import pack_chunks

        fn = self._eval_fn()
        params = self.model_params()
        out = []
        for i in range(0, len(items), batch_size):
            part = list(items[i:i + batch_size])
            arrays = pack_chunks(self.mdef.config, [self.builder.build(part)], self.cfg.buckets)
            with jax.set_mesh(self.mesh):
                out.append(to_host(fn(params, arrays)))  # every host evaluates; gathered across hosts
        return np.concatenate(out)

    @functools.cache
    def _eval_fn(self):
        return jax.jit(functools.partial(embed_fn, self.mdef, self.token_id, jnp.dtype(self.cfg.compute_dtype), False))

    def model_params(self):
        from .. import lora as lora_lib

        model = self.state["params"]["model"]
        return lora_lib.combine(model, self.frozen) if self.frozen else model

    def evaluate(self) -> dict[str, float]:
        """Hit@1 of query -> positive among the held-out pairs (chance = 1/N)."""
        out = {}
        for name, recs in self.eval_sets.items():
            q = self.embed_items([r.query for r in recs])
            p = self.embed_items([r.positive for r in recs])
            hit = float(np.mean(np.argmax(q @ p.T, axis=1) == np.arange(len(recs))))
            out[f"eval/{name}/hit1"] = hit
            out[f"eval/{name}/chance"] = 1.0 / len(recs)
        return out

    # -- loop
    def run(self, steps: int | None = None, *, progress: bool = True) -> dict:
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
        it = self._iterator(start)
        writer = MetricsWriter(self.workdir / "metrics.jsonl", resume_step=start, enabled=jax.process_index() == 0)
        lr_fn = schedule(cfg.optim, cfg.steps)
        base_key = jax.random.key(cfg.seed)
        bar = tqdm(range(start, total), initial=start, total=total, disable=not progress, desc="train-embedder")
        last = {}
        try:
            for step in bar:
                t0 = time.perf_counter()
                records = next(it)
                q, p = self.host_batch(records)
                q, p = self.device_batch(q), self.device_batch(p)
                with jax.set_mesh(self.mesh):
                    self.state, metrics = self._update(self.state, self.frozen, q, p, jax.random.fold_in(base_key, step))
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                dt = time.perf_counter() - t0
                row = {"step": step + 1, "loss": metrics["loss"], "lr": float(lr_fn(step)),
                       "pairs_per_s": len(records) * self.process[1] / dt, "step_s": dt,
                       **{k: v for k, v in metrics.items() if k != "loss"}}
                if cfg.eval_every and ((step + 1) % cfg.eval_every == 0 or step + 1 == total):
                    row.update(self.evaluate())
                writer.write(row)
                last = row
                bar.set_postfix(loss=f"{row['loss']:.3f}")
                if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == total:
                    ckpt.save(step + 1, self.state, {"step": step + 1, "iterator": it.get_state()}, force=True)
        finally:
            ckpt.close()
            writer.close()
        return last

    def export(self, out_dir, *, overwrite=False):
        """Merged (LoRA folded in) HF checkpoint with the tokenizer (with <emb>) and emb_token_ids."""
        from ..hf import Qwen3VLHandle, save_hf

        params = self.model_params()
        mdef, merged = self.mdef.merged(params)
        handle = Qwen3VLHandle(self.base.config, mdef, merged, self.mesh, source=self.model_dir)
        return save_hf(handle, out_dir, overwrite=overwrite, extra_config={"emb_token_ids": [self.token_id]},
                       write_extra=self.tokenizer.save_pretrained)


def toy_corpus(manifest) -> list[str]:
    """Every text of the toy datasets (queries, positives, T-CoTs), to train the toy tokenizer on."""
    texts = []
    for d in manifest["datasets"].values():
        raw = Path(d["path"]).read_text()
        rows = [json.loads(line) for line in raw.splitlines() if line.strip()] if d["format"] == "mmeb" else json.loads(raw)
        for row in rows:
            texts += [v for v in _strings(row)]
    return texts


def _strings(obj):
    if isinstance(obj, str):
        if not obj.endswith((".png", ".jpg")):
            yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)


def build_tiny_base(path: Path, seed: int = 0, corpus=None, vocab: int = 1024):
    """A toy Embedder base built offline: a tiny random Qwen3-VL, a BPE tokenizer trained on the
    toy corpus (so prompts stay short) with <emb> added, and an image processor."""
    from ..testing import image_processor, tiny_hf_model, tiny_tokenizer

    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tiny_hf_model(seed=seed, vocab=vocab).save_pretrained(tmp)
    tok = tiny_tokenizer(corpus, vocab_size=vocab - 16)
    tok.add_tokens(["<emb>"])
    tok.save_pretrained(tmp)
    image_processor(min_tokens=4, max_tokens=16).save_pretrained(tmp)
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)

