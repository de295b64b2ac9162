"""Prefill throughput: embedrl_jax vs transformers' PyTorch Qwen3-VL, same config, inputs and cores.

    python benchmarks/forward.py [--batch 4] [--side 448] [--text 128]

Prints tokens/s for both, their ratio, and each side's achieved FLOP/s as a fraction of
a jitted jnp.dot peak measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import tempfile

import numpy as np

import common


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--side", type=int, default=448)
    ap.add_argument("--text", type=int, default=128)
    ap.add_argument("--exact", action="store_true", help="no shape bucketing (pad nothing)")
    args = ap.parse_args()

    import jax
    import torch

    import embedrl_jax
    from embedrl_jax.models.qwen3_vl.inputs import Buckets

    cfg = json.loads(common.PRESET.read_text())
    model = common.hf_model()
    inputs = common.image_inputs(args.batch, args.side, args.text)
    b, seq = inputs["input_ids"].shape
    g = args.side // 16
    flops = common.forward_flops(cfg, b, seq, g * g, b, b * seq)

    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        handle = embedrl_jax.load_hf(tmp, buckets=Buckets(exact=args.exact))

    tin = {k: torch.from_numpy(v) for k, v in inputs.items()}

    def torch_fwd():
        with torch.no_grad():
            return model(**tin).logits

    batch, info = handle.prepare(**inputs)

    def jax_fwd():
        with jax.set_mesh(handle.mesh):
            return handle._logits(handle.params, batch, dtype=handle.dtype).block_until_ready()

    # same numbers first
    ref = torch_fwd().numpy()
    out = np.asarray(jax_fwd())[:, :seq]
    err = float(np.abs(out - ref).max())

    peak = common.matmul_peak()
    times = common.time_interleaved({"torch": torch_fwd, "jax": jax_fwd})
    peak = max(peak, common.matmul_peak())  # the machine drifts: the higher ceiling is the stricter one
    t_torch, t_jax = times["torch"], times["jax"]
    tokens = b * seq
    print(f"config: bench_80m ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params), batch {b}, "
          f"{args.side}x{args.side} image + {args.text} text tokens = {seq} tokens/sample, float32, "
          f"{common.threads_note()}, jax devices {jax.devices()[0].platform} x{jax.device_count()}")
    print(f"padded shapes (ours): seq {batch['input_ids'].shape[1]}, patch rows {batch['patches'].shape[:2]}")
    print(f"max |logits diff| = {err:.2e}")
    print(f"matmul peak (jitted jnp.dot, best of 1024^2 / 2048^2 f32, before and after): {peak / 1e9:.1f} GFLOP/s")
    print(f"{'':14s}{'s/step':>10s}{'tokens/s':>12s}{'GFLOP/s':>10s}{'% peak':>8s}")
    for name, t in (("transformers", t_torch), ("embedrl_jax", t_jax)):
        print(f"{name:14s}{t:10.4f}{tokens / t:12.1f}{flops / t / 1e9:10.1f}{100 * flops / t / peak:7.1f}%")
    print(f"ratio embedrl_jax / transformers (tokens/s): {t_torch / t_jax:.2f}x")


if __name__ == "__main__":
    main()
