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


def decode_matmuls(params, rows: int):
    """A jitted function doing only a decode step's weight matmuls: `rows` rows times every
    decoder weight (split per layer, as the sampler's CPU loop reads them) and the LM head.

    Each product feeds the next one's input (a decode step is a chain), through one small
    elementwise op, and nothing else runs: no norms, attention, cache writes or sampling. Its
    time is the ceiling XLA:CPU's matmul kernels put on a decode step at this batch size.
    """
    import jax
    import jax.numpy as jnp

    layers = params["layers"]
    n = jax.tree.leaves(layers)[0].shape[0]
    mats = []
    for i in range(n):
        for name in ("q", "k", "v", "o", "gate", "up", "down"):
            w = layers[name][i]
            # o is [heads, head_dim, D] (two contracted dims); the others are [in, out...]
            mats.append(w.reshape(-1, w.shape[-1]) if name == "o" else w.reshape(w.shape[0], -1))
    mats.append(params["lm_head"] if "lm_head" in params else params["embed"].T)
    mats = [jnp.asarray(m) for m in mats]  # per-layer copies, made once, as the sampler does
    width = max(m.shape[0] for m in mats)

    @jax.jit
    def chain(x0, ws):
        y = jnp.zeros((rows, 1), x0.dtype)
        for w in ws:
            y = (x0[:, : w.shape[0]] + y[:, :1]) @ w
        return y[:, :1]

    x0 = jnp.full((rows, width), 1e-3, jnp.float32)
    return lambda: chain(x0, mats).block_until_ready()


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
    matmuls = min(common.time_it(decode_matmuls(p, args.batch), min_seconds=1.0) for _ in range(3))
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
    print(f"the decode step's weight matmuls alone ({args.batch} rows, nothing else): {1e3 * matmuls:.1f} ms "
          f"-> {100 * bound / matmuls:.0f} % of the bandwidth bound (XLA:CPU's ceiling for a decode step here)")


if __name__ == "__main__":
    main()
