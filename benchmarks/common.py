"""Shared pieces of the benchmarks: the ~80M config, inputs, timing, matmul peak, FLOP counts.

Every benchmark runs the reference (transformers / PyTorch) and ours in one process on
the same cores, and prints both figures with their ratio. Nothing here is a test.
"""
from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PRESET = ROOT / "configs" / "models" / "bench_80m.json"


def hf_config():
    from transformers import Qwen3VLConfig

    return Qwen3VLConfig(**json.loads(PRESET.read_text()))


def hf_model(seed=0):
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    torch.manual_seed(seed)
    return Qwen3VLForConditionalGeneration(hf_config()).eval()


def image_inputs(batch: int, side: int, text_tokens: int, seed: int = 0):
    """batch x (vision_start, side x side image, vision_end, text) with random pixels and ids."""
    cfg = json.loads(PRESET.read_text())
    patch, merge = 16, 2
    g = side // patch
    n_tok = g * g // (merge * merge)
    rng = np.random.default_rng(seed)
    row = [cfg["vision_start_token_id"]] + [cfg["image_token_id"]] * n_tok + [cfg["vision_end_token_id"]]
    ids = np.stack([row + list(rng.integers(10, 30000, size=text_tokens)) for _ in range(batch)]).astype(np.int64)
    return dict(
        input_ids=ids,
        attention_mask=np.ones_like(ids),
        mm_token_type_ids=(ids == cfg["image_token_id"]).astype(np.int64),
        pixel_values=rng.standard_normal((batch * g * g, 3 * 2 * patch * patch)).astype(np.float32),
        image_grid_thw=np.array([[1, g, g]] * batch, np.int64),
    )


def time_it(fn, *, warmup=2, repeats=5, min_seconds=3.0):
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - start < min_seconds:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
        if len(times) >= 50:
            break
    return statistics.median(times)


def time_interleaved(fns: dict, *, warmup=2, rounds=5, block=2):
    """Median seconds per call for several functions run in alternating blocks, so that drift
    in machine speed (shared hosts, frequency changes) hits every contender alike.

    Each round runs every function `block + 1` times back to back and times the last `block`
    calls. The untimed first call after a switch absorbs the previous contender's wind-down:
    PyTorch's OpenMP workers spin-wait after each parallel region and, on 2 cores, took the
    cores from the next JAX step (a JAX train step timed right after a PyTorch step ran ~30 %
    slower than in a loop of its own). So the figure is each side's steady-state call, as in
    a training or decoding loop.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            fn()
            for _ in range(block):
                t = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def matmul_peak(sizes=(1024, 2048), dtype="float32"):
    """FLOP/s of a jitted jnp.dot on this machine, the best over a few square sizes: the
    practical compute ceiling (on this 2-core VM 1024^2 sometimes beat 2048^2 by 15 %)."""
    import jax
    import jax.numpy as jnp

    f = jax.jit(lambda x, y: x @ y)
    best = 0.0
    for n in sizes:
        a = jnp.ones((n, n), dtype)
        sec = min(time_it(lambda: f(a, a).block_until_ready(), min_seconds=1.0) for _ in range(3))
        best = max(best, 2 * n**3 / sec)
    return best


def forward_flops(cfg: dict, batch: int, seq: int, frame_patches: int, frames: int, lm_head_tokens: int) -> float:
    """Useful matmul FLOPs of one forward (no padding), the same formula for both sides."""
    t, v = cfg["text_config"], cfg["vision_config"]
    d, f, hd = t["hidden_size"], t["intermediate_size"], t.get("head_dim", 128)
    nh, kv, layers = t["num_attention_heads"], t["num_key_value_heads"], t["num_hidden_layers"]
    per_tok = 2 * (d * nh * hd + 2 * d * kv * hd + nh * hd * d + 3 * d * f)
    attn = 2 * 2 * seq * seq * nh * hd  # QK^T and PV over the full square, per layer
    text = layers * (batch * seq * per_tok + batch * attn) + 2 * lm_head_tokens * d * t["vocab_size"]
    dv, fv, depth = v["hidden_size"], v["intermediate_size"], v["depth"]
    patches = frames * frame_patches
    pdim = 3 * 2 * 16 * 16
    per_patch = 2 * (4 * dv * dv + 2 * dv * fv)
    vattn = 2 * 2 * frame_patches * frame_patches * dv
    vision = 2 * patches * pdim * dv + depth * (patches * per_patch + frames * vattn)
    mergers = (1 + len(v["deepstack_visual_indexes"])) * 2 * (patches // 4) * (16 * dv * dv + 4 * dv * d)
    return float(text + vision + mergers)


def threads_note():
    import torch

    return f"torch threads {torch.get_num_threads()}, cores {os.cpu_count()}"
