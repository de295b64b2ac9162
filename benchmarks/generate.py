"""Decode throughput: embedrl_jax's jitted KV-cache loop vs transformers' generate, same config and cores.

    python benchmarks/generate.py [--batch 8] [--prompt 32] [--new 128]

Prints new tokens/s for both (greedy, text prompts), their ratio, and our decode step time
against the memory-bandwidth bound (bytes of weights read per step -- decoder layers, final
norm, LM head; not the vision tower nor the embedding table -- / a streaming-read bandwidth
measured in the same run).
"""
from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np

import common


def stream_bandwidth(nbytes=512 * 2**20):
    """Bytes/s of a jitted full read of a large array (sum), the decode step's ceiling."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((nbytes // 4,), jnp.float32)
    f = jax.jit(lambda a: a.sum())
    sec = min(common.time_it(lambda: f(x).block_until_ready(), min_seconds=1.0) for _ in range(3))
    return nbytes / sec


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=128)
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp
    import torch

    import embedrl_jax
    from embedrl_jax.models.qwen3_vl.inputs import pack_inputs
    from embedrl_jax.reason.sampler import jitted_generate

    model = common.hf_model()
    rng = np.random.default_rng(0)
    ids = rng.integers(10, 30000, size=(args.batch, args.prompt)).astype(np.int64)
    inputs = dict(input_ids=ids, attention_mask=np.ones_like(ids))
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        handle = embedrl_jax.load_hf(tmp)
    arrays, info = pack_inputs(handle.model_config, **inputs, pad_to=args.prompt)
    gen = jitted_generate(handle.model_def, args.new, (), 0.0, 0, 1.0)
    deltas = jnp.asarray(info["rope_deltas"])

    def ours():
        return jax.block_until_ready(gen(handle.params, arrays, deltas, jax.random.key(0)))

    tin = {k: torch.from_numpy(v) for k, v in inputs.items()}

    def theirs():
        with torch.no_grad():
            return model.generate(**tin, do_sample=False, max_new_tokens=args.new, min_new_tokens=args.new,
                                  pad_token_id=0, eos_token_id=None)

    mine = np.asarray(ours()[0])
    ref = theirs()[:, args.prompt:].numpy()
    agree = float((mine == ref).mean())
    times = common.time_interleaved({"torch": theirs, "jax": ours}, warmup=1, rounds=3, block=1)
    # prefill alone (1 new token) to separate the decode steps
    gen1 = jitted_generate(handle.model_def, 1, (), 0.0, 0, 1.0)
    prefill = min(common.time_it(lambda: jax.block_until_ready(gen1(handle.params, arrays, deltas, jax.random.key(0))),
                                 min_seconds=1.0) for _ in range(2))
    step = (times["jax"] - prefill) / max(args.new - 1, 1)
    # bytes a decode step must read: the decoder layers, the final norm and the LM head (the
    # tied embedding when there is none); the vision tower is not run and the embedding table
    # only gives B rows
    def nbytes(tree):
        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))

    p = handle.params
    weight_bytes = nbytes(p["layers"]) + nbytes(p["norm"]) + nbytes(p["lm_head"] if "lm_head" in p else p["embed"])
    all_bytes = nbytes(p)
    bw = stream_bandwidth()
    bound = weight_bytes / bw
    new = args.batch * args.new
    print(f"config: bench_80m ({all_bytes / 1e6:.0f} MB of float32 weights, {weight_bytes / 1e6:.0f} MB read per "
          f"decode step), batch {args.batch} text prompts of "
          f"{args.prompt} tokens x {args.new} new tokens, greedy, {common.threads_note()}")
    print(f"greedy tokens equal to transformers': {100 * agree:.1f} %")
    print(f"{'':14s}{'s/run':>10s}{'new tok/s':>12s}")
    for name, k in (("transformers", "torch"), ("embedrl_jax", "jax")):
        print(f"{name:14s}{times[k]:10.3f}{new / times[k]:12.1f}")
    print(f"ratio embedrl_jax / transformers (new tokens/s): {times['torch'] / times['jax']:.2f}x")
    print(f"decode step {1e3 * step:.1f} ms; decode-read weights / streaming bandwidth ({bw / 1e9:.1f} GB/s) = {1e3 * bound:.1f} ms "
          f"-> {100 * bound / step:.0f} % of the bandwidth bound")


if __name__ == "__main__":
    main()
