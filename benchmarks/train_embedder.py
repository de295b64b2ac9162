"""Embedder train-step throughput: embedrl_jax's jitted update vs a PyTorch transformers step
with the same loss (symmetric InfoNCE at the <emb> token), config, batch and cores.

    python benchmarks/train_embedder.py [--pairs 4] [--side 224] [--text 64]

A step is forward + backward + AdamW over all parameters, float32; queries and positives
are both samples of one image + text, so `--pairs 4` is a batch of 8 samples.
"""
from __future__ import annotations

import argparse
import functools
import json
import tempfile


import common


def step_matmuls(cfg: dict, towers: int, batch: int, seq: int, rows: int, row_len: int):
    """[(lhs shape, rhs shape)] of every matmul in a train step on these padded shapes: for each
    linear layer its forward, input-gradient and weight-gradient products, for each attention
    its two forward and four backward batched products; nothing else (no LM head, no loss).
    """
    t, v = cfg["text_config"], cfg["vision_config"]
    d, f, hd = t["hidden_size"], t["intermediate_size"], t.get("head_dim", 128)
    nh, kv = t["num_attention_heads"], t["num_key_value_heads"]
    dv, fv, vh = v["hidden_size"], v["intermediate_size"], v["num_heads"]
    pdim = v["in_channels"] * v["temporal_patch_size"] * v["patch_size"] ** 2

    def linear(m, k, n, input_grad=True):
        return [((m, k), (k, n)), ((k, m), (m, n))] + ([((m, n), (n, k))] if input_grad else [])

    def attention(b, s, h):
        return 2 * [((b, s, h), (b, h, s))] + 4 * [((b, s, s), (b, s, h))]

    text, patches, merged = batch * seq, rows * row_len, rows * row_len // 4
    one = linear(patches, pdim, dv, input_grad=False)
    for _ in range(v["depth"]):
        for k, n in ((dv, 3 * dv), (dv, dv), (dv, fv), (fv, dv)):
            one += linear(patches, k, n)
        one += attention(rows * vh, row_len, dv // vh)
    for _ in range(1 + len(v["deepstack_visual_indexes"])):
        one += linear(merged, 4 * dv, 4 * dv) + linear(merged, 4 * dv, d)
    for _ in range(t["num_hidden_layers"]):
        for k, n in ((d, nh * hd), (d, kv * hd), (d, kv * hd), (nh * hd, d), (d, f), (d, f), (f, d)):
            one += linear(text, k, n)
        one += attention(batch * nh, seq, hd)
    return towers * one


def time_matmuls(shapes) -> float:
    """Seconds per call of one jitted function doing just these matmuls, as independent products
    (XLA may overlap them, as it may in the step): the step's matmul time with nothing else."""
    import jax
    import jax.numpy as jnp

    buffers = {}
    args = [[buffers.setdefault(s, jnp.full(s, 1e-3, jnp.float32)) for s in pair] for pair in shapes]

    @jax.jit
    def run(args):
        # every product is its own parameters (no CSE); the barrier keeps each whole
        outs = [jax.lax.optimization_barrier(a @ b)[..., :1, :1].sum() for a, b in args]
        return sum(outs)

    return common.time_it(lambda: run(args).block_until_ready(), warmup=1, repeats=3, min_seconds=2.0)


def time_optimizer(optimizer, params, opt_state) -> float:
    """Seconds per jitted optimizer update (the step's clip + AdamW), donated as in the step,
    on copies of the weights and moments with gradients = weights."""
    import jax
    import jax.numpy as jnp
    import optax

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def run(params, opt_state, grads):
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    grads = jax.tree.map(jnp.copy, params)
    box = {"s": jax.tree.map(jnp.copy, (params, opt_state))}

    def once():
        box["s"] = jax.block_until_ready(run(*box["s"], grads))

    return common.time_it(once, repeats=5, min_seconds=1.0)


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
    rows, row_len = q["patches"].shape[1:3]
    matmuls = time_matmuls(step_matmuls(cfg_json, 2, b, q["input_ids"].shape[-1], rows, row_len))
    adamw = time_optimizer(optimizer, box["state"]["params"], box["state"]["opt_state"])
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
    print(f"the step's matmuls alone (same padded shapes, nothing else): {matmuls:.4f} s -> "
          f"{100 * flops / matmuls / peak:.1f}% of peak; the rest of our step: {times['jax'] - matmuls:.4f} s")
    print(f"the optimizer alone (clip + AdamW over the trained weights): {adamw:.4f} s; matmuls + optimizer: "
          f"{matmuls + adamw:.4f} s -> {100 * flops / (matmuls + adamw) / peak:.1f}% of peak, the ceiling of a step "
          f"made of XLA:CPU's kernels with every norm, activation, softmax and residual free")


if __name__ == "__main__":
    main()
