"""Rotary embeddings: interleaved M-RoPE for the decoder, axial 2-D RoPE for the vision tower.

`get_rope_index` runs on the host in numpy (it depends on ragged grids and padding) and
reproduces transformers' `Qwen3VLModel.get_rope_index` exactly; the cos/sin tables are
computed on device from integer positions.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np


# ---------------------------------------------------------------- host side (numpy)
def get_rope_index(
    input_ids: np.ndarray,
    mm_token_type_ids: np.ndarray | None,
    image_grid_thw: np.ndarray | None,
    video_grid_thw: np.ndarray | None,
    attention_mask: np.ndarray | None,
    spatial_merge_size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """(3, B, L) T/H/W positions and (B,) rope deltas, as transformers computes them.

    Text runs count up by one per token; a vision run of grid (t, h, w) patches lays its
    merged tokens on a (t, h/m, w/m) mesh starting at the current position and then
    advances the position by max(h, w)/m. Videos are split into per-frame grids first.
    Padding (attention_mask == 0) is skipped and keeps position 0.
    """
    input_ids = np.asarray(input_ids)
    b, length = input_ids.shape
    types = np.zeros_like(input_ids) if mm_token_type_ids is None else np.asarray(mm_token_type_ids)
    mask = np.ones((b, length), bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    image_grids = iter(np.asarray(image_grid_thw).reshape(-1, 3)) if image_grid_thw is not None else iter(())
    video_grids = ()
    if video_grid_thw is not None:
        vg = np.asarray(video_grid_thw).reshape(-1, 3)
        vg = np.repeat(vg, vg[:, 0], axis=0)
        vg[:, 0] = 1
        video_grids = vg
    video_grids = iter(video_grids)
    m = spatial_merge_size
    positions = np.zeros((3, b, length), np.int64)
    deltas = np.zeros((b,), np.int64)
    for row in range(b):
        row_types = types[row][mask[row]]
        n = len(row_types)
        out = np.zeros((3, n), np.int64)
        cur = 0
        start = 0
        while start < n:
            kind = row_types[start]
            end = start
            while end < n and row_types[end] == kind:
                end += 1
            if kind == 0:
                out[:, start:end] = cur + np.arange(end - start)
                cur += end - start
            else:
                grids = image_grids if kind == 1 else video_grids
                try:
                    t, h, w = (int(x) for x in next(grids))
                except StopIteration:
                    field = "image_grid_thw" if kind == 1 else "video_grid_thw"
                    raise ValueError(f"row {row}: more {('image', 'video')[kind - 1]} runs than entries in {field}")
                lt, lh, lw = t, h // m, w // m
                tt, hh, ww = np.meshgrid(np.arange(lt), np.arange(lh), np.arange(lw), indexing="ij")
                run = np.stack([tt.ravel() + cur, hh.ravel() + cur, ww.ravel() + cur])
                if run.shape[1] != end - start:
                    raise ValueError(
                        f"row {row}: a run of {end - start} {('image', 'video')[kind - 1]} tokens does not match "
                        f"its grid {(t, h, w)} ({run.shape[1]} merged tokens)"
                    )
                out[:, start:end] = run
                cur += max(h, w) // m
            start = end
        positions[:, row, mask[row]] = out
        deltas[row] = (out.max() + 1 - n) if n else 0
    return positions, deltas


# ---------------------------------------------------------------- device side (jnp)
def rotate_half(x):
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x, cos, sin):
    """x [B, N, L, H] (heads first); cos/sin [B, L, H] broadcast over heads; fp32 math."""
    dtype = x.dtype
    x = x.astype(jnp.float32)
    cos, sin = cos[:, None], sin[:, None]
    return (x * cos + rotate_half(x) * sin).astype(dtype)


def mrope_axis_map(head_dim: int, section: tuple[int, int, int]) -> np.ndarray:
    """Which of T/H/W (0/1/2) drives each of the head_dim/2 frequencies (interleaved)."""
    j = np.arange(head_dim // 2)
    axis = np.zeros_like(j)
    axis[(j % 3 == 1) & (j < 3 * section[1])] = 1
    axis[(j % 3 == 2) & (j < 3 * section[2])] = 2
    return axis


def mrope_cos_sin(positions, head_dim: int, theta: float, section):
    """positions (3, B, L) int -> cos, sin (B, L, head_dim) in fp32."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    axis = mrope_axis_map(head_dim, tuple(section))
    # pick, per frequency, the position row that drives it: (B, L, hd/2)
    pos = jnp.moveaxis(positions.astype(jnp.float32), 0, -1)[..., axis]
    freqs = pos * jnp.asarray(inv_freq, jnp.float32)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def vision_cos_sin(rowcol, head_dim: int, theta: float):
    """rowcol (..., 2) int patch coordinates -> cos, sin (..., head_dim) fp32 (axial layout)."""
    dim = head_dim // 2
    inv_freq = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    f = rowcol.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)  # (..., 2, hd/4)
    hw = jnp.concatenate([f[..., 0, :], f[..., 1, :]], axis=-1)
    emb = jnp.concatenate([hw, hw], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)
