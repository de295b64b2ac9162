"""KV-cache decoding for Qwen3-VL: prefill a left-padded prompt batch, then one token per step.

The cache is a dict: keys/values heads-first per layer ("k", "v": [layers, B, K, S, H] stacked,
or a list of [B, K, S, H] per layer), "valid" [B, S] (slot s of row b holds a real prompt token
or a generated one), "slot" (where the next token goes) and "pos" [B] (its M-RoPE position:
n_valid + t + rope_delta on all three axes, so the rope delta of image/video prompts carries the
vision compression over; `reason.sequences.with_completions` gives the training forward the
same positions).

Two layer loops, chosen by the target (`Target.decode_layer_loop`): "scan" runs the stacked
layers and writes each layer's new keys/values in place in the stacked carried cache;
"unrolled" splits the stacked weights once per `Decoder` (one transient copy of the decoder
weights per generate call) so no decode step copies a weight slice, which XLA:CPU does inside a
scan at every step.

Precision: keys and values are held in the compute dtype (`dtype`: bf16 on accelerators, where
the trainer computes in bf16 — half the cache, and the rounding the trainer's forward has too);
the next-token logits are fp32 with the trainer's LM-head products (`_logits`).

Sharding: under a mesh (`jax.set_mesh`) the cache is laid out by logical names, rows over
("data", "fsdp") and KV heads over "tensor" where they divide, so no device holds all of it.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ...sharding import constrain
from ..logprobs import head_operands
from ..platform import Target
from .attention import Layout, attend, xla_attention
from .layers import scan_layers
from .text import text_segments

CACHE_AXES = ("layers", "batch", "kv_heads", "seq", "head_dim")
LAYER_LOOPS = ("scan", "unrolled")


class Decoder:
    """Prefill and decode step of one model (an NNX module merged from params inside a trace).

    Build it once, outside the decode loop: with the "unrolled" loop it holds the per-layer
    weight slices that every step reads."""

    def __init__(self, model, *, dtype, target: Target, layer_loop: str | None = None):
        layer_loop = target.decode_layer_loop if layer_loop is None else layer_loop
        if layer_loop not in LAYER_LOOPS:
            raise ValueError(f"layer_loop must be one of {LAYER_LOOPS}, got {layer_loop!r}")
        self.model, self.dtype, self.target, self.layer_loop = model, dtype, target, layer_loop
        self.n_layers = model.cfg.text.num_hidden_layers
        if layer_loop == "unrolled":
            graphdef, state = nnx.split(model.layers)
            self.layers = [nnx.merge(graphdef, jax.tree.map(lambda w, i=i: w[i], state)) for i in range(self.n_layers)]

    # ------------------------------------------------------------------ cache
    def init_cache(self, batch_size: int, length: int) -> dict:
        """An empty cache of `length` slots per row."""
        t = self.model.cfg.text
        shape = (batch_size, t.num_key_value_heads, length, t.head_dim)
        if self.layer_loop == "scan":
            k, v = (constrain(jnp.zeros((self.n_layers,) + shape, self.dtype), CACHE_AXES) for _ in range(2))
        else:
            k, v = ([constrain(jnp.zeros(shape, self.dtype), CACHE_AXES[1:]) for _ in range(self.n_layers)]
                    for _ in range(2))
        return {"k": k, "v": v, "valid": jnp.zeros((batch_size, length), bool), "slot": jnp.int32(0),
                "pos": jnp.zeros((batch_size,), jnp.int32)}

    # ------------------------------------------------------------------ layers
    def _layers(self, x, cos, sin, mask, cache, write_at, deep=None):
        """Every decoder layer once over x [B, T, D]: layer i writes the chunk's keys/values at slot
        `write_at` of its cache and attends with `mask`: a 4-tuple (q_seg, k_seg, q_idx, k_idx) over
        the whole cache (a decode step: xla, memory linear in the cache), or, for the prefill, the
        prompt's segment ids [B, T]: causal attention over the prompt's own fresh keys (the cache
        holds nothing else yet) by the config's kernel, so a long prompt never has a
        [T, cache] score matrix where the kernel is splash. Returns (h, k, v)."""
        model, target = self.model, self.target

        def attention(q, k, v, layer_k, layer_v):
            if isinstance(mask, tuple):
                return xla_attention(q, layer_k, layer_v, *mask, target=target)
            return attend(q, k, v, mask, mask, layout=Layout(causal=True),
                          attention=model.cfg.attention, target=target)
        if self.layer_loop == "scan":
            def write(stack, new, i):
                start = (i, 0, 0, write_at, 0)
                return constrain(jax.lax.dynamic_update_slice(stack, new[None].astype(stack.dtype), start), CACHE_AXES)

            def body(layer, carry, i):
                h, ck, cv = carry
                q, k, v = layer.project_qkv(h, cos, sin)
                ck, cv = write(ck, k, i), write(cv, v, i)
                layer_k = jax.lax.dynamic_index_in_dim(ck, i, keepdims=False)
                layer_v = jax.lax.dynamic_index_in_dim(cv, i, keepdims=False)
                h = layer.finish(h, attention(q, k, v, layer_k, layer_v))
                return model.add_deepstack(h, deep, i), ck, cv

            steps = jnp.arange(self.n_layers, dtype=jnp.int32)
            return scan_layers(model.layers, body, (x, cache["k"], cache["v"]), steps, target=target)
        ks, vs = list(cache["k"]), list(cache["v"])
        for i, layer in enumerate(self.layers):
            q, k, v = layer.project_qkv(x, cos, sin)
            ks[i] = jax.lax.dynamic_update_slice_in_dim(ks[i], k.astype(ks[i].dtype), write_at, axis=2)
            vs[i] = jax.lax.dynamic_update_slice_in_dim(vs[i], v.astype(vs[i].dtype), write_at, axis=2)
            x = model.add_deepstack(layer.finish(x, attention(q, k, v, ks[i], vs[i])), deep, i)
        return x, ks, vs

    def _logits(self, h):
        """fp32 next-token logits [B, V] with the LM-head products the trainer's log-probs use
        (`logprobs.head_operands`: bf16 operands with fp32 accumulation, or fp32 at HIGHEST)."""
        h = self.model.final_norm(h)[:, 0]
        op_dtype, precision = head_operands(h.dtype)
        kernel = self.model.head_kernel().astype(op_dtype)
        out = jnp.einsum("bd,dv->bv", h.astype(op_dtype), kernel, precision=precision,
                         preferred_element_type=jnp.float32)
        return constrain(out, ("batch", "vocab"))

    # ------------------------------------------------------------------ entry points
    def prefill(self, batch, rope_deltas, cache_len: int):
        """(logits [B, V] fp32 for the token after each prompt, cache) for a left-padded packed batch.

        `cache_len`: slots per row, the prompt length plus the tokens to come."""
        model, dtype = self.model, self.dtype
        b, p_len = batch["input_ids"].shape
        if cache_len < p_len:
            raise ValueError(f"cache_len {cache_len} is shorter than the prompt ({p_len} tokens)")
        cache = self.init_cache(b, cache_len)
        prompt_valid = batch["attention_mask"] > 0
        valid = cache["valid"].at[:, :p_len].set(prompt_valid)
        x, deep = model.embed_inputs(batch, dtype, self.target)
        cos, sin = model.rope(batch["positions"], dtype)
        # padded prompt positions are a segment of their own: no query row is left without a key
        h, ck, cv = self._layers(x, cos, sin, text_segments(batch["attention_mask"]), cache, 0, deep)
        n_valid = prompt_valid.sum(-1).astype(jnp.int32)
        cache = {"k": ck, "v": cv, "valid": valid, "slot": jnp.int32(p_len),
                 "pos": n_valid + jnp.asarray(rope_deltas, jnp.int32)}
        return self._logits(h[:, -1:]), cache

    def step(self, cache, tokens):
        """(logits [B, V] fp32 for the next token, cache) after appending tokens [B] at cache["slot"]."""
        model, dtype = self.model, self.dtype
        b, total = cache["valid"].shape
        slot = cache["slot"]
        valid = jax.lax.dynamic_update_slice_in_dim(cache["valid"], jnp.ones((b, 1), bool), slot, axis=1)
        positions = jnp.broadcast_to(cache["pos"][None, :, None], (3, b, 1))
        cos, sin = model.rope(positions, dtype)
        x = constrain(jnp.take(model.embed[...], tokens[:, None], axis=0), (None, None, "embed"))  # as the table
        x = constrain(x.astype(dtype), ("batch", "seq", None))
        k_idx = jnp.broadcast_to(jnp.arange(total, dtype=jnp.int32), (b, total))
        mask = (jnp.zeros((b, 1), jnp.int32), jnp.where(valid, 0, -1), jnp.full((b, 1), slot, jnp.int32), k_idx)
        h, ck, cv = self._layers(x, cos, sin, mask, cache, slot)
        cache = {"k": ck, "v": cv, "valid": valid, "slot": slot + 1, "pos": cache["pos"] + 1}
        return self._logits(h), cache
