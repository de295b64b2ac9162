"""The one table between Hugging Face tensor names and our parameter paths.

Each row names an HF key pattern (with `{i}` for a stacked layer index), our path, how
many stacked copies there are, and a transform kind. Import and export both walk this
table; a fused HF tensor (the vision qkv) appears in several rows with a `part` index.
"""
from __future__ import annotations

import dataclasses
import numpy as np

from .config import Qwen3VLConfig


@dataclasses.dataclass(frozen=True)
class Row:
    hf: str  # HF key, with {i} for the stacked index
    path: tuple[str, ...]  # our param path
    kind: str  # transform kind, see TRANSFORMS
    stack: str | None = None  # "text_layers" | "vision_blocks" | "deepstack" | None
    part: int | None = None  # slice of a fused HF tensor
    parts: int = 1


def _rows(cfg: Qwen3VLConfig) -> list[Row]:
    L = "model.language_model"
    V = "model.visual"
    rows = [
        Row(f"{L}.embed_tokens.weight", ("embed",), "identity"),
        Row(f"{L}.norm.weight", ("norm",), "identity"),
        Row(f"{V}.patch_embed.proj.weight", ("visual", "patch_embed"), "conv3d"),
        Row(f"{V}.patch_embed.proj.bias", ("visual", "patch_bias"), "identity"),
        Row(f"{V}.pos_embed.weight", ("visual", "pos_embed"), "identity"),
    ]
    if not cfg.tie_word_embeddings:
        rows.append(Row("lm_head.weight", ("lm_head",), "linear"))
    lay = f"{L}.layers.{{i}}"
    for hf, ours, kind in (
        ("input_layernorm.weight", "input_norm", "identity"),
        ("post_attention_layernorm.weight", "post_norm", "identity"),
        ("self_attn.q_proj.weight", "q", "linear_in_heads"),
        ("self_attn.k_proj.weight", "k", "linear_in_heads"),
        ("self_attn.v_proj.weight", "v", "linear_in_heads"),
        ("self_attn.o_proj.weight", "o", "linear_out_heads"),
        ("self_attn.q_norm.weight", "q_norm", "identity"),
        ("self_attn.k_norm.weight", "k_norm", "identity"),
        ("mlp.gate_proj.weight", "gate", "linear"),
        ("mlp.up_proj.weight", "up", "linear"),
        ("mlp.down_proj.weight", "down", "linear"),
    ):
        rows.append(Row(f"{lay}.{hf}", ("layers", ours), kind, "text_layers"))
    blk = f"{V}.blocks.{{i}}"
    for hf, ours, kind in (
        ("norm1.weight", "norm1_scale", "identity"),
        ("norm1.bias", "norm1_bias", "identity"),
        ("norm2.weight", "norm2_scale", "identity"),
        ("norm2.bias", "norm2_bias", "identity"),
        ("attn.proj.weight", "o", "linear_out_heads"),
        ("attn.proj.bias", "o_bias", "identity"),
        ("mlp.linear_fc1.weight", "fc1", "linear"),
        ("mlp.linear_fc1.bias", "fc1_bias", "identity"),
        ("mlp.linear_fc2.weight", "fc2", "linear"),
        ("mlp.linear_fc2.bias", "fc2_bias", "identity"),
    ):
        rows.append(Row(f"{blk}.{hf}", ("visual", "blocks", ours), kind, "vision_blocks"))
    for part, name in enumerate(("q", "k", "v")):
        rows.append(Row(f"{blk}.attn.qkv.weight", ("visual", "blocks", name), "linear_in_heads", "vision_blocks", part, 3))
        rows.append(Row(f"{blk}.attn.qkv.bias", ("visual", "blocks", f"{name}_bias"), "bias_heads", "vision_blocks", part, 3))
    for prefix, path, stack in (
        (f"{V}.merger", ("visual", "merger"), None),
        (f"{V}.deepstack_merger_list.{{i}}", ("visual", "deepstack"), "deepstack"),
    ):
        if stack and not cfg.vision.deepstack_visual_indexes:
            continue
        for hf, ours, kind in (
            ("norm.weight", "norm_scale", "identity"),
            ("norm.bias", "norm_bias", "identity"),
            ("linear_fc1.weight", "fc1", "linear"),
            ("linear_fc1.bias", "fc1_bias", "identity"),
            ("linear_fc2.weight", "fc2", "linear"),
            ("linear_fc2.bias", "fc2_bias", "identity"),
        ):
            rows.append(Row(f"{prefix}.{hf}", path + (ours,), kind, stack))
    return rows


def stack_size(cfg: Qwen3VLConfig, stack: str | None) -> int:
    return {
        None: 1,
        "text_layers": cfg.text.num_hidden_layers,
        "vision_blocks": cfg.vision.depth,
        "deepstack": len(cfg.vision.deepstack_visual_indexes),
    }[stack]


class Mapping:
    """Both directions of the table for one config."""

    def __init__(self, cfg: Qwen3VLConfig):
        self.cfg = cfg
        self.rows = _rows(cfg)

    def hf_keys(self) -> list[str]:
        keys = []
        for row in self.rows:
            for i in range(stack_size(self.cfg, row.stack)):
                key = row.hf.format(i=i)
                if key not in keys:
                    keys.append(key)
        return keys

    def to_jax(self, row: Row, hf_tensor: np.ndarray, target_shape: tuple[int, ...]) -> np.ndarray:
        """One HF tensor (one layer) -> our layout for one layer (without the stack axis)."""
        x = hf_tensor
        if row.part is not None:
            size = x.shape[0] // row.parts
            x = x[row.part * size : (row.part + 1) * size]
        kind = row.kind
        if kind == "identity":
            out = x
        elif kind == "linear":
            out = x.T
        elif kind == "linear_in_heads":  # (N*H, D) -> (D, N, H)
            out = x.T.reshape(target_shape)
        elif kind == "linear_out_heads":  # (D, N*H) -> (N, H, D)
            out = x.T.reshape(target_shape)
        elif kind == "bias_heads":  # (N*H,) -> (N, H)
            out = x.reshape(target_shape)
        elif kind == "conv3d":  # (Dv, C, Tp, P, P) -> (C*Tp*P*P, Dv)
            out = x.reshape(x.shape[0], -1).T
        else:
            raise ValueError(f"unknown transform {kind!r}")
        if tuple(out.shape) != tuple(target_shape):
            raise ValueError(
                f"tensor {row.hf} has shape {hf_tensor.shape}; it maps to {out.shape} but "
                f"parameter {'/'.join(row.path)} expects {tuple(target_shape)}"
            )
        return np.ascontiguousarray(out)

    def to_hf(self, row: Row, ours: np.ndarray, hf_shape: tuple[int, ...] | None = None) -> np.ndarray:
        """One layer of our parameter -> its HF tensor (or its part of a fused tensor)."""
        kind = row.kind
        if kind in ("identity",):
            out = ours
        elif kind == "linear":
            out = ours.T
        elif kind == "linear_in_heads":
            out = ours.reshape(ours.shape[0], -1).T
        elif kind == "linear_out_heads":
            out = ours.reshape(-1, ours.shape[-1]).T
        elif kind == "bias_heads":
            out = ours.reshape(-1)
        elif kind == "conv3d":
            v = self.cfg.vision
            out = ours.T.reshape(ours.shape[1], v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
        else:
            raise ValueError(f"unknown transform {kind!r}")
        return np.ascontiguousarray(out)

    def hf_shape(self, row: Row, layer_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of the HF tensor one layer of `row` belongs to (whole fused tensor)."""
        kind, s = row.kind, tuple(layer_shape)
        if kind == "identity":
            out = s
        elif kind == "linear":
            out = s[::-1]
        elif kind == "linear_in_heads":
            out = (s[1] * s[2], s[0])
        elif kind == "linear_out_heads":
            out = (s[-1], s[0] * s[1])
        elif kind == "bias_heads":
            out = (s[0] * s[1],)
        elif kind == "conv3d":
            v = self.cfg.vision
            out = (s[1], v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
        else:
            raise ValueError(f"unknown transform {kind!r}")
        return (out[0] * row.parts,) + tuple(out[1:])

    def grouped_by_hf_key(self) -> dict[str, list[tuple[Row, int]]]:
        """HF key -> [(row, stack index)], parts in order: what export concatenates."""
        groups: dict[str, list[tuple[Row, int]]] = {}
        for row in self.rows:
            for i in range(stack_size(self.cfg, row.stack)):
                groups.setdefault(row.hf.format(i=i), []).append((row, i))
        for key in groups:
            groups[key].sort(key=lambda ri: ri[0].part or 0)
        return groups


def get_path(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def set_path(tree, path, value):
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value

