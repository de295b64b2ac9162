"""Optimizer construction and the train state (a plain dict pytree: step, params, opt_state)."""
from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-4
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int = 10
    min_lr_ratio: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.01
    clip_norm: float = 1.0


def schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    if cfg.schedule == "constant":
        return optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps) if cfg.warmup_steps else optax.constant_schedule(cfg.lr)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.lr, warmup_steps=cfg.warmup_steps,
        decay_steps=max(total_steps, cfg.warmup_steps + 1), end_value=cfg.lr * cfg.min_lr_ratio,
    )


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """AdamW on fp32 master weights with global-norm clipping."""
    return optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm) if cfg.clip_norm else optax.identity(),
        optax.adamw(schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay),
    )


def init_state(params, optimizer: optax.GradientTransformation) -> dict:
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": optimizer.init(params)}


def state_shardings(state_shapes, params_shapes, param_shardings, mesh):
    """Shardings for a train state: each optimizer moment like its parameter, every other leaf
    (step counters, scalars) replicated, so restores never land on a single device."""
    replicated = NamedSharding(mesh, P())
    by_path = {}
    for (path, shape), (_, sharding) in zip(
        jax.tree_util.tree_flatten_with_path(params_shapes)[0], jax.tree_util.tree_flatten_with_path(param_shardings)[0]
    ):
        by_path[tuple(path)] = (tuple(shape.shape), sharding)

    def pick(path, leaf):
        path = tuple(path)
        for n in range(len(path)):
            hit = by_path.get(path[n:])
            if hit is not None and hit[0] == tuple(leaf.shape):
                return hit[1]
        return replicated

    return jax.tree_util.tree_map_with_path(pick, state_shapes)


def place_state(trainable, optimizer: optax.GradientTransformation, trainable_shardings, mesh):
    """A fresh train state on the mesh: (state, its shardings, its abstract shapes for restores)."""
    state = init_state(trainable, optimizer)
    shapes = jax.eval_shape(lambda s: s, state)
    shardings = state_shardings(shapes, jax.eval_shape(lambda t: t, trainable), trainable_shardings, mesh)
    return jax.device_put(state, shardings), shardings, shapes
