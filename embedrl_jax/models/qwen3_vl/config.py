"""Qwen3-VL model configuration: a frozen mirror of transformers' config.json.

The dataclasses hold only what the JAX model needs; the full HF dict is kept beside them
(not hashed) so that export writes back exactly what was read, plus our own fields.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from ...errors import ConfigError

SUPPORTED_MODEL_TYPES = ("qwen3_vl",)
# the `attention` key (see models/qwen3_vl/attention.py): the platform's kernel, or one named explicitly
ATTENTION_KINDS = ("auto", "xla", "splash", "cudnn")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    out_hidden_size: int
    patch_size: int = 16
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    in_channels: int = 3
    num_position_embeddings: int = 2304
    deepstack_visual_indexes: tuple[int, ...] = (8, 16, 24)
    hidden_act: str = "gelu_pytorch_tanh"
    rope_theta: float = 10000.0
    layer_norm_eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def merge_unit(self) -> int:
        return self.spatial_merge_size**2

    @property
    def grid_side(self) -> int:
        return math.isqrt(self.num_position_embeddings)


@dataclasses.dataclass(frozen=True)
class TextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 5_000_000.0
    mrope_section: tuple[int, int, int] = (24, 20, 20)
    hidden_act: str = "silu"


@dataclasses.dataclass(frozen=True)
class Qwen3VLConfig:
    text: TextConfig
    vision: VisionConfig
    image_token_id: int
    video_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int
    tie_word_embeddings: bool
    emb_token_ids: tuple[int, ...] | None = None
    # attention kernel (not an HF field, never exported): auto | xla | splash | cudnn; part of the
    # hash, so programs traced with different kernels are different programs
    attention: str = "auto"
    hf: dict = dataclasses.field(default_factory=dict, compare=False, hash=False, repr=False)

    # ---- HF config.json <-> dataclasses -------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "Qwen3VLConfig":
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"config.json field 'model_type' is {model_type!r}; embedrl_jax supports {SUPPORTED_MODEL_TYPES}"
            )
        for field in ("text_config", "vision_config"):
            if field not in d:
                raise ValueError(f"config.json has no {field!r}")
        t, v = d["text_config"], d["vision_config"]
        rope = t.get("rope_parameters") or t.get("rope_scaling") or {}
        rope_theta = rope.get("rope_theta", t.get("rope_theta", 5_000_000.0))
        if rope.get("rope_type", "default") not in ("default", None):
            raise ValueError(f"text_config.rope_parameters.rope_type {rope.get('rope_type')!r} is not supported")
        if rope.get("mrope_interleaved") is False:
            raise ValueError("text_config.rope_parameters.mrope_interleaved=False is not Qwen3-VL's layout")
        vrope = v.get("rope_parameters") or {}
        if vrope.get("rope_type", "axial") != "axial":
            raise ValueError(f"vision_config.rope_parameters.rope_type {vrope.get('rope_type')!r} is not supported")
        text = TextConfig(
            vocab_size=t["vocab_size"],
            hidden_size=t["hidden_size"],
            intermediate_size=t["intermediate_size"],
            num_hidden_layers=t["num_hidden_layers"],
            num_attention_heads=t["num_attention_heads"],
            num_key_value_heads=t.get("num_key_value_heads", t["num_attention_heads"]),
            head_dim=t.get("head_dim") or t["hidden_size"] // t["num_attention_heads"],
            rms_norm_eps=t.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            mrope_section=tuple(rope.get("mrope_section", (24, 20, 20))),
            hidden_act=t.get("hidden_act", "silu"),
        )
        if t.get("attention_bias", False):
            raise ValueError("text_config.attention_bias=True is not Qwen3-VL's layout")
        vision = VisionConfig(
            depth=v["depth"],
            hidden_size=v["hidden_size"],
            intermediate_size=v["intermediate_size"],
            num_heads=v["num_heads"],
            out_hidden_size=v["out_hidden_size"],
            patch_size=v.get("patch_size", 16),
            temporal_patch_size=v.get("temporal_patch_size", 2),
            spatial_merge_size=v.get("spatial_merge_size", 2),
            in_channels=v.get("in_channels", 3),
            num_position_embeddings=v.get("num_position_embeddings", 2304),
            deepstack_visual_indexes=tuple(v.get("deepstack_visual_indexes", (8, 16, 24))),
            hidden_act=v.get("hidden_act", "gelu_pytorch_tanh"),
            rope_theta=float(vrope.get("rope_theta", 10000.0)),
        )
        tie = d.get("tie_word_embeddings", t.get("tie_word_embeddings", False))
        emb = d.get("emb_token_ids")
        cfg = cls(
            text=text,
            vision=vision,
            image_token_id=d.get("image_token_id", 151655),
            video_token_id=d.get("video_token_id", 151656),
            vision_start_token_id=d.get("vision_start_token_id", 151652),
            vision_end_token_id=d.get("vision_end_token_id", 151653),
            tie_word_embeddings=bool(tie),
            emb_token_ids=tuple(emb) if emb else None,
            hf=json.loads(json.dumps(d)),
        )
        cfg.validate()
        return cfg

    @classmethod
    def from_json(cls, path: str | Path) -> "Qwen3VLConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            raise FileNotFoundError(f"no config.json at {path}")
        return cls.from_hf_dict(json.loads(path.read_text()))

    def to_hf_dict(self) -> dict[str, Any]:
        d = json.loads(json.dumps(self.hf)) if self.hf else {"model_type": "qwen3_vl"}
        d["tie_word_embeddings"] = self.tie_word_embeddings
        d.setdefault("text_config", {})["tie_word_embeddings"] = self.tie_word_embeddings
        if self.emb_token_ids:
            d["emb_token_ids"] = list(self.emb_token_ids)
        return d

    def replace(self, **changes) -> "Qwen3VLConfig":
        out = dataclasses.replace(self, **changes)
        if "attention" in changes:
            out.validate()
        return out

    def validate(self) -> None:
        t, v = self.text, self.vision
        if self.attention not in ATTENTION_KINDS:
            raise ConfigError(f"attention: {self.attention!r} is not one of {list(ATTENTION_KINDS)}")
        if sum(t.mrope_section) != t.head_dim // 2:
            raise ValueError(f"mrope_section {t.mrope_section} must sum to head_dim/2 = {t.head_dim // 2}")
        if v.grid_side**2 != v.num_position_embeddings:
            raise ValueError(f"vision num_position_embeddings {v.num_position_embeddings} is not a perfect square")
        if v.out_hidden_size != t.hidden_size:
            raise ValueError(f"vision out_hidden_size {v.out_hidden_size} != text hidden_size {t.hidden_size}")
        if len(v.deepstack_visual_indexes) > t.num_hidden_layers:
            raise ValueError("more deepstack_visual_indexes than text layers")
        if any(not 0 <= i < v.depth for i in v.deepstack_visual_indexes):
            raise ValueError(f"deepstack_visual_indexes {v.deepstack_visual_indexes} out of range for depth {v.depth}")
        if list(v.deepstack_visual_indexes) != sorted(set(v.deepstack_visual_indexes)):
            raise ValueError("deepstack_visual_indexes must be strictly increasing")
        if v.head_dim % 4:
            raise ValueError(f"vision head dim {v.head_dim} must be divisible by 4 (2-D rotary halves)")
        if t.num_attention_heads % t.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")


def load_preset(name: str) -> Qwen3VLConfig:
    """Presets live in configs/ as HF config.json files (e.g. 'qwen3_vl_2b_instruct')."""
    root = Path(__file__).resolve().parents[2] / "configs" / "models"  # package data (embedrl_jax/configs)
    path = root / f"{name}.json"
    if not path.exists():
        known = sorted(p.stem for p in root.glob("*.json"))
        raise ValueError(f"unknown model preset {name!r}; known: {known}")
    return Qwen3VLConfig.from_json(path)
