"""Qwen3-VL: vision tower + placeholder fusion + DeepStack + Qwen3 decoder + LM head.

The NNX module defines the parameters and the computation; outside this file the model
is a `ModelDef` (static graph + config) and a plain parameter pytree, and every entry
point (`hidden`, `logits`) is a pure function of (params, batch) that can be jitted.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ... import lora as lora_lib
from ...lora import LoraConfig
from ...sharding import constrain
from ..platform import Target, resolve
from .config import Qwen3VLConfig
from .decode import Decoder
from .layers import param, rms_norm, scan_layers, stacked
from .rope import mrope_cos_sin
from .text import DecoderLayer, text_segments
from .vision import PatchMerger, VisionBlock, VisionTower

Params = dict[str, Any]


class Qwen3VL(nnx.Module):
    def __init__(self, cfg: Qwen3VLConfig, rngs: nnx.Rngs, lora: LoraConfig | None = None):
        t = cfg.text
        self.cfg = cfg
        self.visual = VisionTower(cfg.vision, rngs, lora)
        self.embed = param(rngs, (t.vocab_size, t.hidden_size), ("vocab", "embed"))
        self.layers = stacked(t.num_hidden_layers, lambda r: DecoderLayer(t, r, lora), rngs)
        self.norm = param(rngs, (t.hidden_size,), ("norm",), "ones")
        self.lm_head = None if cfg.tie_word_embeddings else param(rngs, (t.hidden_size, t.vocab_size), ("embed", "vocab"))

    # ------------------------------------------------------------------ pieces
    def vision_features(self, batch, dtype, target: Target, remat=False, rng=None):
        return self.visual(
            batch["patches"], batch["segment_ids"], batch["pos_idx"], batch["pos_w"], batch["rowcol"],
            target=target, dtype=dtype, remat=remat, rng=rng, attention=self.cfg.attention,
        )

    def embed_inputs(self, batch, dtype, target: Target, remat=False, rng=None):
        """Token embeddings with visual features scattered in, plus DeepStack slabs [K, B, L, D]."""
        x = jnp.take(self.embed[...], batch["input_ids"], axis=0).astype(dtype)
        deep = None
        if "patches" in batch:
            merged, ds = self.vision_features(batch, dtype, target, remat,
                                              None if rng is None else jax.random.fold_in(rng, 1))
            index = batch["visual_index"]
            is_visual = (index >= 0)[..., None]
            safe = jnp.maximum(index, 0)
            x = jnp.where(is_visual, jnp.take(merged, safe, axis=0).astype(dtype), x)
            if ds.shape[0]:
                deep = jnp.where(is_visual[None], jnp.take(ds, safe, axis=1).astype(dtype), 0)
        return constrain(x, ("batch", "seq", None)), deep

    @staticmethod
    def add_deepstack(h, deep, i):
        """After decoder layer i < K, add DeepStack slab i (at the visual tokens; zero elsewhere)."""
        if deep is None:
            return h
        slab = jax.lax.dynamic_index_in_dim(deep, jnp.minimum(i, deep.shape[0] - 1), keepdims=False)
        return h + jnp.where(i < deep.shape[0], slab, jnp.zeros_like(slab))

    def decode_layers(self, x, cos, sin, segments, deep, target: Target, remat=False, rng=None, right_padded=False):
        def body(layer, h, i):
            h = layer(h, cos, sin, segments, None if rng is None else jax.random.fold_in(rng, i), target=target,
                      attention=self.cfg.attention, right_padded=right_padded)
            return self.add_deepstack(h, deep, i)

        return scan_layers(self.layers, body, x, jnp.arange(self.cfg.text.num_hidden_layers),
                           target=target, remat=remat)

    def rope(self, positions, dtype):
        """M-RoPE (cos, sin) for positions [3, B, L], in the compute dtype."""
        t = self.cfg.text
        cos, sin = mrope_cos_sin(positions, t.head_dim, t.rope_theta, t.mrope_section)
        return cos.astype(dtype), sin.astype(dtype)

    def final_norm(self, x):
        return rms_norm(x, self.norm[...], self.cfg.text.rms_norm_eps)

    def __call__(self, batch, *, dtype=jnp.float32, remat=False, rng=None, target: Target | str | None = None,
                 right_padded: bool = False):
        """Final-norm hidden states [B, L, D]; `rng` enables LoRA dropout (training); `target`
        None follows the mesh in the sharding context (`platform.current_target`).
        `right_padded` (static): the caller guarantees every row's attention_mask is a prefix of
        ones, the one text layout cuDNN's fused kernel takes (else cudnn falls back to xla, logged)."""
        target = resolve(target)
        x, deep = self.embed_inputs(batch, dtype, target, remat, rng)
        cos, sin = self.rope(batch["positions"], dtype)
        segments = text_segments(batch["attention_mask"])
        text_rng = None if rng is None else jax.random.fold_in(rng, 2)
        x = self.decode_layers(x, cos, sin, segments, deep, target, remat, text_rng, right_padded)
        return self.final_norm(x)

    def head_kernel(self):
        """[D, V] LM head (the transposed embedding when tied)."""
        return self.embed[...].T if self.lm_head is None else self.lm_head[...]

    def logits(self, hidden):
        kernel = self.head_kernel().astype(hidden.dtype)
        out = jnp.einsum("btd,dv->btv", hidden, kernel, preferred_element_type=jnp.float32)
        return constrain(out, ("batch", "seq", "vocab"))


# ---------------------------------------------------------------- functional boundary
@dataclasses.dataclass(frozen=True)
class ModelDef:
    """Static half of the model: config and NNX graph. Hashable, so it can close over jit."""

    config: Qwen3VLConfig
    graphdef: Any
    abstract_state: Any = dataclasses.field(compare=False, hash=False, repr=False)
    lora: LoraConfig | None = None

    def module(self, params: Params) -> Qwen3VL:
        state = jax.tree.map(lambda x: x, self.abstract_state)
        nnx.replace_by_pure_dict(state, params)
        return nnx.merge(self.graphdef, state)

    def hidden(self, params: Params, batch, *, dtype=jnp.float32, remat=False, rng=None, target=None,
               right_padded=False):
        """Final-norm hidden states. `remat`: a `platform.REMAT` name, a bool, or None/"auto" (the
        target's default); `target` None: the platform of the mesh in the sharding context; the
        attention kernel is the config's `attention` (`right_padded`: see `Qwen3VL.__call__`)."""
        return self.module(params)(batch, dtype=dtype, remat=remat, rng=rng, target=target, right_padded=right_padded)

    def logits(self, params: Params, batch, *, dtype=jnp.float32, remat=False, target=None, right_padded=False):
        model = self.module(params)
        return model.logits(model(batch, dtype=dtype, remat=remat, target=target, right_padded=right_padded))

    def vision(self, params: Params, batch, *, dtype=jnp.float32, target=None):
        """Vision tower alone: merged tokens [R*S/4, D] and DeepStack features [K, R*S/4, D]."""
        return self.module(params).vision_features(batch, dtype, resolve(target))

    def decoder(self, params: Params, *, dtype=jnp.float32, layer_loop: str | None = None, target=None) -> Decoder:
        """KV-cache decoding for these params (call inside the traced function): `prefill` and
        `step`; see `decode.Decoder`."""
        return Decoder(self.module(params), dtype=dtype, layer_loop=layer_loop, target=resolve(target))

    def prefill(self, params: Params, batch, rope_deltas, cache_len: int, *, dtype=jnp.float32,
                layer_loop: str | None = None, target=None):
        """(next-token logits [B, V] fp32, cache) for a left-padded prompt batch; pure."""
        return self.decoder(params, dtype=dtype, layer_loop=layer_loop, target=target).prefill(batch, rope_deltas, cache_len)

    def decode_step(self, params: Params, cache, tokens, *, dtype=jnp.float32, layer_loop: str | None = None,
                    target=None):
        """(logits [B, V] fp32, cache) after appending tokens [B]; pure. In a loop, build one
        `decoder` outside it instead (on CPU it splits the stacked weights once)."""
        return self.decoder(params, dtype=dtype, layer_loop=layer_loop, target=target).step(cache, tokens)

    def abstract_params(self) -> Params:
        return nnx.to_pure_dict(self.abstract_state)

    def param_axes(self) -> Params:
        """Logical axis names per parameter, as a pytree parallel to the params."""
        specs = nnx.get_partition_spec(self.abstract_state)
        return jax.tree.map(lambda s: tuple(s), nnx.to_pure_dict(specs), is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))


    def linear_eqs(self) -> dict[str, str]:
        """Param path of every linear weight -> the einsum it is used with (for LoRA merging)."""
        eqs = {f"layers/{k}": v for k, v in DecoderLayer.EQS.items()}
        eqs.update({f"visual/blocks/{k}": v for k, v in VisionBlock.EQS.items()})
        for where in ("merger", "deepstack"):
            eqs.update({f"visual/{where}/{k}": v for k, v in PatchMerger.EQS.items()})
        return eqs

    def merged(self, params: Params) -> tuple["ModelDef", Params]:
        """The plain model and params with every LoRA adapter folded into its weight."""
        if self.lora is None:
            return self, params
        return model_def(self.config), lora_lib.merge(params, self.lora, self.linear_eqs())


def model_def(cfg: Qwen3VLConfig, lora: LoraConfig | None = None) -> ModelDef:
    """Abstract model: nothing is allocated, so this is cheap for any size."""
    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(lambda: Qwen3VL(cfg, nnx.Rngs(0), lora))
    graphdef, state = nnx.split(abstract, nnx.Param)
    return ModelDef(cfg, graphdef, state, lora)


def init_params(mdef: ModelDef, key, shardings=None) -> Params:
    """Random parameters, created directly in their shards when `shardings` is given."""

    def make(k):
        with nnx.use_eager_sharding(False):
            model = Qwen3VL(mdef.config, nnx.Rngs(k), mdef.lora)
        return nnx.to_pure_dict(nnx.state(model, nnx.Param))

    return jax.jit(make, out_shardings=shardings)(key)


def init_adapters(mdef: ModelDef, key, shardings=None) -> Params:
    """Fresh LoRA adapters only (B = 0); the base initialisers are dead code and compiled away."""
    if mdef.lora is None:
        raise ValueError("init_adapters needs a ModelDef built with a LoraConfig")

    def make(k):
        with nnx.use_eager_sharding(False):
            model = Qwen3VL(mdef.config, nnx.Rngs(k), mdef.lora)
        return lora_lib.split(nnx.to_pure_dict(nnx.state(model, nnx.Param)))[0]

    if shardings is not None:
        shardings = lora_lib.split(shardings)[0]
    return jax.jit(make, out_shardings=shardings)(key)
