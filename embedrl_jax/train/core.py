"""The one trainer core: setup, loop, resume and export, written once for every trainer.

A trainer (train/embedder.py, train/sft.py, train/reasoner.py) subclasses `Trainer` and supplies
its config (a `TrainerConfig` subclass), its data, its step function and its hooks:

    data_iterator(start)  -> iterator of step inputs with get_state() (checkpointed with the state)
    train_step(step, x)   -> metrics row of one step (runs self.update on placed arrays)
    evaluate()            -> eval metrics (called every cfg.eval_every steps)
    abstract_update_args(**dims) -> the update's arguments after the state, as ShapeDtypeStructs

The core owns the rest: mesh, model source (HF or orbax directory, toy base, or *abstract*:
shapes and shardings only), trainable/frozen split, state shardings and placement, optimizer,
one donated jitted update, run loop (exact resume, tqdm, metrics, eval/checkpoint/export
cadence) and the merged atomic export to WORKDIR/export.

Built with `abstract=True` a trainer reads no weights and no data; `programs(**dims)` then gives
its jitted programs with the abstract arguments of one step, so `fn.lower(*args).compile()`
compiles exactly what a run would, on any mesh (compile-only TPU devices included).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm import tqdm

from .. import lora as lora_lib
from ..checkpoint import load_model
from ..config import PRESET_DIR, to_dict
from ..errors import ConfigError, MissingFileError, UserError
from ..fsutil import as_path, is_published, is_remote, primary_first, write_run_config
from ..hf import Qwen3VLHandle, param_shardings, read_hf_config, save_hf
from ..models.platform import frozen_dtype as resolve_frozen_dtype
from ..models.qwen3_vl.attention import buckets_for
from ..models.qwen3_vl.config import ATTENTION_KINDS, Qwen3VLConfig
from ..models.qwen3_vl.inputs import Buckets
from ..models.qwen3_vl.model import init_adapters, model_def
from ..sharding import MeshConfig, data_shard, make_mesh
from ..toy.base import tiny_hf_config
from .checkpoint import TrainCheckpointer, abstract_like
from .metrics import MetricsWriter
from .state import init_state, make_optimizer, schedule, state_shardings

__all__ = ["TrainerConfig", "DebugConfig", "Trainer", "Preempted", "BadStepsError", "REMAT_POLICIES"]

log = logging.getLogger(__name__)

REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "offload")
FLOAT_DTYPES = ("float32", "bfloat16", "float16")
FROZEN_DTYPES = ("auto",) + FLOAT_DTYPES  # "auto": the target's (`Target.frozen_dtype`)


@dataclasses.dataclass(frozen=True)
class DebugConfig:
    """Test-only fault injection (never set in a real run)."""

    nan_steps: tuple[int, ...] = ()  # these steps (1-based, as in metrics.jsonl) get a NaN loss inside the update
    kill_in_save_step: int = 0  # SIGKILL this process right after the (async) save of this step has started


class Preempted(SystemExit):
    """SIGTERM handled: a checkpoint at the agreed step is on disk; exits the process with status 0."""

    def __init__(self, step: int):
        super().__init__(0)
        self.step = step


class BadStepsError(UserError):
    """Too many consecutive steps with a non-finite loss or gradient norm (a checkpoint was saved)."""


def run_buckets(cfg: "TrainerConfig", mesh) -> Buckets:
    """`cfg.buckets` as a run on `mesh` pads with them (`attention.buckets_for`), so the trainers
    pack, and `embedrl plan` compiles, exactly the shapes the kernel tiles."""
    return buckets_for(cfg.buckets, cfg.attention, mesh)


@dataclasses.dataclass(frozen=True)
class TrainerConfig:
    """What every trainer shares; the three trainer configs extend it, so their keys stay flat
    (`steps=`, `mesh.fsdp=`, `buckets.seq_min=` as in the toy configs). Checked when built."""

    steps: int = 100
    epochs: float | None = None  # set: train this many passes over the training data instead of `steps`
    seed: int = 0
    mesh: MeshConfig = MeshConfig()  # noqa: RUF009
    buckets: Buckets = Buckets()  # noqa: RUF009
    compute_dtype: str = "bfloat16"
    # weights nothing trains (LoRA base, GRPO reference, judge); trained parameters always have
    # fp32 masters. auto: the target's (bfloat16 on TPU/GPU, float32 on XLA:CPU; Target.frozen_dtype)
    base_dtype: str = "auto"
    # none | full | dots | dots_no_batch | offload (true = full, false = none); auto: the target's
    # default (full on accelerators, none on XLA:CPU), decided by the model from the mesh's devices
    remat: str | bool = "auto"
    attention: str = "auto"  # auto | xla | splash | cudnn (models/qwen3_vl/attention.py); auto: the target platform's kernel
    checkpoint_every: int = 50
    checkpoint_minutes: float = 0.0  # also checkpoint when this many minutes passed since the last one (0: off)
    keep_checkpoints: int = 3  # >= 2: a damaged latest checkpoint falls back to the previous one
    async_checkpoints: bool = True
    max_consecutive_skips: int = 5  # stop (after saving) when this many steps in a row had a non-finite loss/grad
    eval_every: int = 0  # 0: no periodic evaluation
    export: bool = True  # write the merged model to WORKDIR/export when the run ends
    export_every: int = 0  # also export every this many steps (0: only at the end)
    debug: DebugConfig = DebugConfig()  # noqa: RUF009

    def __post_init__(self):
        if isinstance(self.remat, bool):
            object.__setattr__(self, "remat", "full" if self.remat else "none")
        if self.remat not in REMAT_POLICIES + ("auto",):
            raise ConfigError(f"remat: {self.remat!r} is not one of {list(REMAT_POLICIES) + ['auto']} (or true/false)")
        if self.attention not in ATTENTION_KINDS:
            raise ConfigError(f"attention: {self.attention!r} is not one of {list(ATTENTION_KINDS)}")
        if self.compute_dtype not in FLOAT_DTYPES:
            raise ConfigError(f"compute_dtype: {self.compute_dtype!r} is not one of {list(FLOAT_DTYPES)}")
        check_frozen_dtype("base_dtype", self.base_dtype)
        for name in ("steps", "checkpoint_every", "max_consecutive_skips"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.keep_checkpoints < 2:
            raise ConfigError(f"keep_checkpoints must be >= 2 (a damaged latest checkpoint falls back to the "
                              f"previous one), got {self.keep_checkpoints}")
        if self.checkpoint_minutes < 0:
            raise ConfigError(f"checkpoint_minutes must be >= 0, got {self.checkpoint_minutes}")
        for name in ("eval_every", "export_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.epochs is not None and not self.epochs > 0:
            raise ConfigError(f"epochs must be > 0 or null, got {self.epochs}")
        if self.seed < 0:
            raise ConfigError(f"seed must be >= 0, got {self.seed}")


def check_frozen_dtype(name: str, value) -> None:
    """A frozen-weights dtype key must be "auto" or a float dtype; the error names the key."""
    if value not in FROZEN_DTYPES:
        raise ConfigError(f"{name}: {value!r} is not one of {list(FROZEN_DTYPES)}")


def guard_update(step_fn, updates_per_step: int = 1, nan_steps: tuple[int, ...] = ()):
    """step_fn wrapped so that a step whose loss or gradient norm is not finite changes nothing.

    Why inside the jitted update: the decision costs one select per state leaf on the device,
    never a host round trip or a second run of the step, and the donated state stays donated.
    Parameters and optimizer state (moments, the optimizer's step count, hence the schedule)
    keep their old values; `step` still advances (it counts the steps tried, so the data and the
    step keys stay aligned with the loop); `skipped` / `skipped_in_row` count the skips.
    `nan_steps` (test-only, 1-based loop steps) replace the loss with NaN at those steps.
    """

    def guarded(state, *args):
        new, metrics = step_fn(state, *args)
        loss = metrics["loss"]
        if nan_steps:
            loop_step = state["step"] // updates_per_step + 1
            loss = jnp.where(jnp.isin(loop_step, jnp.asarray(nan_steps, jnp.int32)), jnp.nan, loss)
        ok = jnp.isfinite(loss) & jnp.isfinite(metrics.get("grad_norm", jnp.float32(0)))
        kept = jax.tree.map(lambda n, o: jnp.where(ok, n, o),
                            {k: v for k, v in new.items() if k not in ("step", "skipped", "skipped_in_row")},
                            {k: v for k, v in state.items() if k not in ("step", "skipped", "skipped_in_row")})
        bad = (~ok).astype(jnp.int32)
        out = dict(kept, step=new["step"], skipped=state["skipped"] + bad,
                   skipped_in_row=jnp.where(ok, 0, state["skipped_in_row"] + 1))
        return out, dict(metrics, loss=loss)

    return guarded


# ------------------------------------------------------------------ the trainer
class Trainer:
    """Base of every trainer; see the module docstring for the hooks a trainer supplies."""

    desc = "train"  # progress-bar label
    updates_per_step = 1  # optimizer updates per step (the learning-rate schedule counts these)

    def __init__(self, cfg: TrainerConfig, workdir, *, mesh=None, abstract: bool = False):
        if not isinstance(cfg, TrainerConfig):
            raise TypeError(f"{type(self).__name__} needs a TrainerConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.abstract = abstract
        self.workdir = as_path(workdir) if is_remote(workdir) else Path(workdir)  # an object-store URL works too
        self.mesh = mesh if mesh is not None else make_mesh(cfg.mesh)
        self.replicated = NamedSharding(self.mesh, P())
        # (index, count) of this process's data shard: the processes whose devices hold the same batch
        # rows (tensor groups spanning hosts) load the same samples; elsewhere (process_index, process_count)
        self.process = data_shard(self.mesh)
        self.frozen: dict = {}
        if not abstract:
            self.workdir.mkdir(parents=True, exist_ok=True)
            write_run_config(self.workdir, to_dict(cfg))

    # -- model source
    def model_dir(self, spec: str, build_toy, name: str = "tiny_base") -> Path:
        """`spec` "tiny": WORKDIR/<name>, built once by `build_toy(path)` (process 0 first);
        otherwise an HF (config.json) or orbax (params/) directory."""
        if spec != "tiny":
            path = Path(spec)
            if not ((path / "config.json").exists() or (path / "params").is_dir()):
                raise MissingFileError(f"model {path}: no config.json (Hugging Face) or params/ (orbax)")
            return path
        path = self.workdir / name

        def build():
            if not (path / "config.json").exists():
                build_toy(path)

        primary_first(build, f"embedrl_{name}_{type(self).__name__}")
        return path

    @functools.cached_property
    def buckets(self) -> Buckets:
        """The configured buckets for this run's attention kernel (`run_buckets`); the config and
        the mesh are fixed for the trainer's life, so resolved once, not per packed batch."""
        return run_buckets(self.cfg, self.mesh)

    # -- precision
    def frozen_dtype(self, setting: str | None = None) -> str:
        """A frozen-weights dtype setting (default: cfg.base_dtype) resolved for this trainer's
        mesh: "auto" -> the target's `frozen_dtype` (bfloat16 on TPU/GPU, float32 on XLA:CPU),
        decided by the mesh's devices, so a compile-only TPU mesh gets the TPU choice."""
        setting = self.cfg.base_dtype if setting is None else setting
        return resolve_frozen_dtype(setting, self.mesh)

    def to_frozen(self, tree, dtype: str | None = None):
        """`tree` (arrays or ShapeDtypeStructs) in the frozen dtype, shardings kept; leaves
        already in it are returned as they are (no copy)."""
        want = jnp.dtype(dtype or self.frozen_dtype())
        if all(x.dtype == want for x in jax.tree.leaves(tree)):
            return tree
        if self.abstract:
            return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, want, sharding=x.sharding), tree)
        return jax.jit(lambda t: jax.tree.map(lambda x: x.astype(want), t),
                       out_shardings=jax.tree.map(lambda x: x.sharding, tree))(tree)

    def load_base(self, spec: str, build_toy=None, *, dtype: str | None = None,
                  masters: bool = False) -> Qwen3VLHandle:
        """The base model on the mesh; with `abstract`, its config and ShapeDtypeStruct params only.

        dtype: default cfg.base_dtype ("auto" resolved by `frozen_dtype`). `masters`: these weights
        seed fp32 trained masters (full fine-tuning): with "auto" they load in float32, so the
        masters start from the checkpoint's own values, not a bf16 rounding of them; whatever of
        them stays frozen is cast to the frozen dtype afterwards (`split_params`, `to_frozen`).

        Abstract sources: "tiny" (the toy base's shape), an HF/orbax directory (config.json only
        is read), a config.json-style file, or a model preset name (configs/models/<name>.json).
        """
        setting = self.cfg.base_dtype if dtype is None else dtype
        dtype = "float32" if (masters and setting == "auto") else self.frozen_dtype(setting)
        if not self.abstract:
            self.source = self.model_dir(spec, build_toy)
            return load_model(self.source, mesh=self.mesh, dtype=dtype, attention=self.cfg.attention)
        self.source = None
        if spec == "tiny":
            hf = tiny_hf_config(vocab=1024)
            ours = Qwen3VLConfig.from_hf_dict(hf.to_dict())
        elif Path(spec).is_dir():
            hf, ours = read_hf_config(spec)
        else:
            path = Path(spec) if Path(spec).suffix == ".json" else PRESET_DIR / "models" / f"{spec}.json"
            if not path.is_file():
                raise MissingFileError(f"model {spec!r}: not a directory, config file or preset in {path.parent}")
            hf, ours = None, Qwen3VLConfig.from_hf_dict(json.loads(path.read_text()))
        mdef = model_def(ours.replace(attention=self.cfg.attention))
        shardings = param_shardings(mdef, self.mesh)
        params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, jnp.dtype(dtype), sharding=s),
                              mdef.abstract_params(), shardings)
        return Qwen3VLHandle(hf, mdef, params, self.mesh)

    # -- trainable / frozen
    def split_params(self, mdef, base_params, lora, *, frozen_keys=()):
        """(trainable, frozen, trainable shardings). LoRA: fresh adapters (key fold_in(seed, 1))
        trained, the whole base frozen. Full fine-tuning: an fp32 copy of every weight but the
        top-level `frozen_keys` is trained: a real copy, so the donated update never deletes the
        base weights a caller keeps (e.g. as the GRPO reference); drop them if unused. The frozen
        part is in the frozen dtype (`frozen_dtype`); trained parameters are fp32."""
        shardings = param_shardings(mdef, self.mesh)
        key = jax.random.fold_in(jax.random.key(self.cfg.seed), 1)
        if lora is not None:
            if self.abstract:
                trainable = jax.tree.map(
                    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                    jax.eval_shape(lambda k: init_adapters(mdef, k), key), lora_lib.split(shardings)[0])
            else:
                trainable = init_adapters(mdef, key, shardings)
            return trainable, base_params, lora_lib.split(shardings)[0]
        train_sh = {k: v for k, v in shardings.items() if k not in frozen_keys}
        frozen = self.to_frozen({k: v for k, v in base_params.items() if k in frozen_keys})
        base = {k: v for k, v in base_params.items() if k not in frozen_keys}
        if self.abstract:
            trainable = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32, sharding=x.sharding), base)
        else:
            trainable = jax.jit(lambda t: jax.tree.map(lambda x: jnp.array(x, jnp.float32, copy=True), t),
                                out_shardings=train_sh)(base)
        return trainable, frozen, train_sh

    # -- state, optimizer, the one update
    def setup_state(self, trainable, trainable_shardings, schedule_steps: int):
        """Optimizer and the train state {step, params, opt_state}, placed (or abstract)."""
        self.schedule_steps = schedule_steps
        self.optimizer = make_optimizer(self.cfg.optim, schedule_steps)
        self.state_shapes = jax.eval_shape(lambda t: self._init_state(t), trainable)
        self.state_shardings = state_shardings(self.state_shapes, jax.eval_shape(lambda t: t, trainable),
                                               trainable_shardings, self.mesh)
        if self.abstract:
            self.state = abstract_like(self.state_shapes, self.state_shardings)
        else:
            self.state = jax.device_put(self._init_state(trainable), self.state_shardings)

    def _init_state(self, trainable):
        """The optimizer's state plus two step counters the update guard keeps: skipped steps in
        all and in a row (checkpointed, so a resumed run counts on exactly)."""
        return dict(init_state(trainable, self.optimizer), skipped=jnp.zeros((), jnp.int32),
                    skipped_in_row=jnp.zeros((), jnp.int32))  # two buffers: the state is donated

    def jit_update(self, step_fn, extra_shardings: tuple, batch_args: int):
        """step_fn(state, *extra, *batch) -> (state, metrics) as one jitted, donated function:
        the state in and out on its shardings, `extra` (frozen weights) on theirs, metrics
        replicated; batch arguments arrive already placed. The step is guarded: see `guard_update`."""
        step_fn = guard_update(step_fn, self.updates_per_step, self.cfg.debug.nan_steps)
        self.update = jax.jit(step_fn, in_shardings=(self.state_shardings, *extra_shardings) + (None,) * batch_args,
                              out_shardings=(self.state_shardings, self.replicated), donate_argnums=(0,))
        return self.update

    def programs(self, **dims) -> dict[str, tuple[Any, tuple]]:
        """{name: (jitted function, abstract arguments)} of one step with batch dims `dims`
        (see each trainer's `abstract_update_args`): `fn.lower(*args).compile()` compiles it."""
        return {"update": (self.update, (abstract_like(self.state_shapes, self.state_shardings),
                                         *self.abstract_update_args(**dims)))}

    def abstract_update_args(self, **dims) -> tuple:
        raise NotImplementedError

    def abstract_key(self) -> jax.ShapeDtypeStruct:
        """A step's PRNG key argument, replicated."""
        k = jax.eval_shape(lambda: jax.random.key(0))
        return jax.ShapeDtypeStruct(k.shape, k.dtype, sharding=self.replicated)

    def model_params(self):
        """The model's full parameters now (adapters combined with the frozen base)."""
        model = self.state["params"]["model"]
        return lora_lib.combine(model, self.frozen) if self.frozen else model

    # -- hooks with defaults
    def evaluate(self) -> dict[str, float]:
        return {}

    def check_resume(self, data_state: dict) -> None:
        """Raise if the checkpointed data state cannot be resumed exactly."""

    def steps_per_epoch(self) -> float:
        raise ConfigError(f"epochs: {type(self).__name__} counts steps only")

    def postfix(self, row: dict) -> dict:
        return {"loss": f"{row['loss']:.3f}"} if "loss" in row else {}

    def export_config(self) -> dict:
        return {}

    def total_steps(self) -> int:
        """cfg.steps, or with cfg.epochs that many passes over the data (an abstract trainer has no
        data: cfg.steps)."""
        if self.cfg.epochs is None or self.abstract:
            return self.cfg.steps
        return max(1, int(np.ceil(self.cfg.epochs * self.steps_per_epoch())))

    # -- the loop
    def run(self, steps: int | None = None, *, progress: bool = True, export: bool | None = None) -> dict:
        """Train (resuming from WORKDIR/checkpoints) until `steps` (default: the config's);
        returns the last metrics row. Exports to WORKDIR/export at the end when `export` (default
        cfg.export) and a step ran or no export exists yet.

        Faults: on SIGTERM the hosts agree on a step, save it, wait and raise `Preempted` (exit
        status 0); a step with a non-finite loss or gradient norm changes nothing (see
        `guard_update`) and is counted; `max_consecutive_skips` of them in a row save and raise
        `BadStepsError`. A damaged latest checkpoint is skipped for the previous one."""
        if self.abstract:
            raise UserError("an abstract trainer (shapes only) compiles its programs; it cannot run")
        cfg = self.cfg
        total = self.total_steps() if steps is None else steps
        ckpt = TrainCheckpointer(self.workdir / "checkpoints", max_to_keep=cfg.keep_checkpoints,
                                 async_save=cfg.async_checkpoints)
        start = 0
        try:
            restored, data_state = ckpt.restore_latest(self.state_shapes, self.state_shardings)
            if restored is not None:
                self.check_resume(data_state)
                self.state, start = restored, int(data_state["step"])
        except BaseException:
            ckpt.close()
            raise
        it = self.data_iterator(start)
        writer = MetricsWriter(self.workdir / "metrics.jsonl", resume_step=start, enabled=jax.process_index() == 0)
        lr_fn = schedule(cfg.optim, self.schedule_steps)
        bar = tqdm(range(start, total), initial=start, total=total, disable=not progress, desc=self.desc)
        last = {}
        stop = _StopSignal()
        last_save = time.monotonic()
        skipped_before = int(jax.device_get(self.state["skipped"]))

        def save(at: int, *, wait: bool = False):
            nonlocal last_save
            ckpt.save(at, self.state, {"step": at, "iterator": it.get_state()}, force=True)
            writer.flush()
            last_save = time.monotonic()
            if cfg.debug.kill_in_save_step == at:
                os.kill(os.getpid(), signal.SIGKILL)  # test-only: die while the async save runs
            if wait:
                ckpt.wait()

        try:
            for step in bar:
                x = next(it)
                row = {"step": step + 1, **self.train_step(step, x)}
                row.setdefault("lr", float(lr_fn(step * self.updates_per_step)))
                skipped, in_row = (int(v) for v in jax.device_get((self.state["skipped"], self.state["skipped_in_row"])))
                # bad (non-finite) steps; "skipped" stays the trainers' own count of skipped records
                row["skipped_steps"], row["skipped_steps_total"] = skipped - skipped_before, skipped
                skipped_before = skipped
                if row["skipped_steps"]:
                    log.warning("step %d: loss %s, gradient norm %s: not finite; update skipped (%d in a row)",
                                step + 1, row.get("loss"), row.get("grad_norm"), in_row)
                if cfg.eval_every and ((step + 1) % cfg.eval_every == 0 or step + 1 == total):
                    row.update(self.evaluate())
                writer.write(row)
                last = row
                bar.set_postfix(**self.postfix(row))
                if in_row >= cfg.max_consecutive_skips:
                    save(step + 1, wait=True)
                    raise BadStepsError(
                        f"step {step + 1}: {in_row} steps in a row had a non-finite loss or gradient norm "
                        f"(max_consecutive_skips={cfg.max_consecutive_skips}); the last batch's datasets: "
                        f"{', '.join(self.batch_datasets(x)) or 'unknown'}; checkpoint saved at step {step + 1} "
                        f"in {ckpt.directory}")
                preempted = self._preempted(step + 1, stop)
                timed = self._clock_due(last_save)
                if preempted or timed or (step + 1) % cfg.checkpoint_every == 0 or step + 1 == total:
                    save(step + 1, wait=preempted)
                if preempted:
                    msg = (f"preempted (SIGTERM): checkpoint saved at step {step + 1} in {ckpt.directory}; "
                           f"run the same command again to resume")
                    print(f"embedrl: {msg}", file=sys.stderr, flush=True)  # also without logging set up
                    raise Preempted(step + 1)
                if cfg.export_every and (step + 1) % cfg.export_every == 0 and step + 1 != total:
                    self.export()
        finally:
            stop.restore()
            ckpt.close()
            writer.close()
        if (cfg.export if export is None else export) and (last or not ((self.export_dir / "config.json").exists()
                                                                 and is_published(self.export_dir))):
            self.export()
        return last

    def _preempted(self, step: int, stop: "_StopSignal") -> bool:
        """True at the one step every host agreed on after a SIGTERM: JAX's preemption sync point
        when distributed (every host calls it every step), this process's own flag otherwise."""
        if self.process[1] > 1:
            try:
                return bool(multihost_utils.reached_preemption_sync_point(step))
            except RuntimeError:  # the preemption service is off: fall back to the signal flag
                pass
        return stop.requested

    def _clock_due(self, last_save: float) -> bool:
        """Wall-clock checkpointing: process 0's clock decides for every host."""
        if not self.cfg.checkpoint_minutes:
            return False
        due = time.monotonic() - last_save >= 60 * self.cfg.checkpoint_minutes
        if self.process[1] > 1:
            due = bool(multihost_utils.broadcast_one_to_all(np.int32(due)))
        return due

    def batch_datasets(self, x) -> list[str]:
        """The datasets of one step's input (for error messages): records' `dataset` names."""
        try:
            return sorted({str(r.dataset) for r in x if getattr(r, "dataset", "")})
        except TypeError:
            return []

    # -- export
    @property
    def export_dir(self):
        return self.workdir / "export"

    def export(self, out_dir=None, *, overwrite: bool = True) -> Path:
        """The merged model (LoRA folded in) as an HF directory with the tokenizer, the image
        processor and `export_config()` (the Embedder's emb_token_ids), published atomically;
        tensors keep the source checkpoint's dtypes."""
        out = as_path(out_dir) if out_dir is not None else self.export_dir
        mdef, merged = self.mdef.merged(self.model_params())
        handle = Qwen3VLHandle(self.base.config, mdef, merged, self.mesh, source=self.source,
                               source_dtypes=self.base.source_dtypes)

        def processors(tmp: Path):  # a local directory (save_hf stages it for object stores)
            self.tokenizer.save_pretrained(tmp)
            if not (tmp / "preprocessor_config.json").exists():
                self.image_processor.save_pretrained(tmp)

        return save_hf(handle, out, overwrite=overwrite, extra_config=self.export_config() or None,
                       write_extra=processors)


class _StopSignal:
    """SIGTERM sets a flag the loop reads between steps (the step in flight finishes). With one
    process the handler is ours; distributed, JAX's preemption service watches the signal."""

    def __init__(self):
        self.requested = False
        self._previous = None
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum, frame):
        self.requested = True

    def restore(self):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
