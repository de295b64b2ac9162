"""Embedder train-step throughput: embedrl_jax's jitted update vs a PyTorch transformers step
with the same loss (symmetric InfoNCE at the <emb> token), config, batch and cores.

    python benchmarks/train_embedder.py [--pairs 4] [--side 224] [--text 64]

A step is forward + backward + AdamW over all parameters, float32; queries and positives
are both samples of one image + text, so `--pairs 4` is a batch of 8 samples.
"""
from __future__ import annotations

import argparse
import json
import tempfile


import common


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--side", type=int, default=224)
    ap.add_argument("--text", type=int, default=64)
    args = ap.parse_args()

    import jax
    import torch

    import embedrl_jax
    from embedrl_jax.models.qwen3_vl.inputs import pack_chunks
    from embedrl_jax.train.embedder import EmbedderTrainConfig, make_update
    from embedrl_jax.train.state import OptimConfig, init_state, make_optimizer

    cfg_json = json.loads(common.PRESET.read_text())
    emb_id = 31999
    model = common.hf_model()
    b = args.pairs
    q_in = common.image_inputs(b, args.side, args.text, seed=1)
    p_in = common.image_inputs(b, args.side, args.text, seed=2)
    for x in (q_in, p_in):  # end every sample with <emb>
        x["input_ids"][:, -1] = emb_id
    seq = q_in["input_ids"].shape[1]
    g = args.side // 16
    flops = 3 * common.forward_flops(cfg_json, 2 * b, seq, g * g, 2 * b, 0)  # fwd + bwd ~ 3x fwd, no LM head

    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        handle = embedrl_jax.load_hf(tmp)
    mdef = handle.model_def
    tcfg = EmbedderTrainConfig(lora=None, compute_dtype="float32", grad_cache_chunks=1,
                               optim=OptimConfig(lr=1e-5, warmup_steps=0, schedule="constant"))
    optimizer = make_optimizer(tcfg.optim, 100)
    update = jax.jit(make_update(mdef, optimizer, tcfg, emb_id), donate_argnums=(0,))
    # as the trainer does for full fine-tuning: the unused LM head is frozen (PyTorch's AdamW
    # likewise skips it: it gets no gradient)
    trainable = {k: v for k, v in handle.params.items() if k != "lm_head"}
    frozen = {k: v for k, v in handle.params.items() if k == "lm_head"}
    state = init_state({"model": trainable}, optimizer)
    q = jax.device_put(pack_chunks(mdef.config, [q_in], handle.buckets))
    p = jax.device_put(pack_chunks(mdef.config, [p_in], handle.buckets))
    key = jax.random.key(0)
    box = {"state": state}

    def jax_step():
        box["state"], metrics = update(box["state"], frozen, q, p, key)
        return metrics["loss"].block_until_ready()

    # PyTorch: the same loss on the same model, AdamW over all parameters
    torch_model = model.train()
    opt = torch.optim.AdamW(torch_model.parameters(), lr=1e-5, weight_decay=0.01)
    tq = {k: torch.from_numpy(v) for k, v in q_in.items()}
    tp = {k: torch.from_numpy(v) for k, v in p_in.items()}

    def embed(inputs):
        h = torch_model.model(**inputs).last_hidden_state
        idx = (inputs["input_ids"] == emb_id).int().argmax(-1) * 0 + inputs["input_ids"].shape[1] - 1
        e = h[torch.arange(h.shape[0]), idx]
        return torch.nn.functional.normalize(e.float(), dim=-1)

    def torch_step():
        qe, pe = embed(tq), embed(tp)
        logits = 50.0 * qe @ pe.T
        labels = torch.arange(b)
        loss = 0.5 * (torch.nn.functional.cross_entropy(logits, labels) + torch.nn.functional.cross_entropy(logits.T, labels))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(torch_model.parameters(), 1.0)
        opt.step()
        return loss.item()

    first = (torch_step(), float(jax_step()))
    peak = common.matmul_peak()
    times = common.time_interleaved({"torch": torch_step, "jax": jax_step}, warmup=1, rounds=5)
    peak = max(peak, common.matmul_peak())  # the machine drifts: the higher ceiling is the stricter one
    print(f"config: bench_80m, {b} pairs = {2 * b} samples of one {args.side}x{args.side} image + {args.text} text "
          f"tokens ({seq} tokens/sample), full-parameter AdamW, float32, {common.threads_note()}")
    print(f"first-step loss: transformers {first[0]:.4f}, embedrl_jax {first[1]:.4f} (same weights, same batch)")
    print(f"matmul peak (jitted jnp.dot, best of 1024^2 / 2048^2 f32, before and after): {peak / 1e9:.1f} GFLOP/s")
    print(f"{'':14s}{'s/step':>10s}{'pairs/s':>10s}{'GFLOP/s':>10s}{'% peak':>8s}")
    for name, key_ in (("transformers", "torch"), ("embedrl_jax", "jax")):
        t = times[key_]
        print(f"{name:14s}{t:10.4f}{b / t:10.2f}{flops / t / 1e9:10.1f}{100 * flops / t / peak:7.1f}%")
    print(f"ratio embedrl_jax / transformers (pairs/s): {times['torch'] / times['jax']:.2f}x")


if __name__ == "__main__":
    main()
