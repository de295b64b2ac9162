"""Host-side packing of transformers-named inputs into static-shape model arrays.

Bucketing rule (one rule for sequence length, patch-row length and row count):
    bucket(n) = n rounded up to a multiple of max(2**(floor(log2 n) - 4), granule), and at least
    `minimum` (granule 8 for tokens and patches, 1 for the count of patch rows).
So every octave has 16 buckets, padding wastes at most 6.25 %, and a jitted forward
compiles once per bucket instead of once per image size or prompt length (e.g. 326
tokens -> 336, 784 patches -> 800, 3000 patches -> 3072).
Where attention runs as Pallas splash (TPU), sequence and patch-row lengths are further rounded
up to a multiple of its block multiple, 128 (`Buckets.multiple`, set by `Buckets.for_attention`):
326 tokens -> 384, 784 patches -> 896, 3000 -> 3072. `Buckets.seq_max` (when set) is the
configured maximum sequence length: a longer input row is refused, naming the row.

Vision patches are packed into rows: every image frame (and every video frame group) is
one attention segment of h*w patches; frames are placed in order into rows of the
bucketed longest-frame length, next-fit, each patch carrying its segment id (-1 is
padding). Attention is block-diagonal by segment id, so per-frame attention is exact
while small frames share rows. The merged visual tokens are gathered into the sequence
through an index map (-1 = not visual), which keeps fusion and DeepStack shape-static.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from ...errors import ConfigError, UserError
from .config import Qwen3VLConfig
from .rope import get_rope_index

SPLASH_MULTIPLE = 128  # splash's lane width: its q/kv blocks, hence padded lengths, are multiples of it

HF_INPUT_NAMES = (
    "input_ids",
    "attention_mask",
    "pixel_values",
    "image_grid_thw",
    "pixel_values_videos",
    "video_grid_thw",
    "mm_token_type_ids",
)


def bucket(n: int, minimum: int = 16, granule: int = 8) -> int:
    """Round n up to the next bucket (16 per octave, >= minimum)."""
    n = max(int(n), 1)
    if n <= minimum:
        return minimum
    step = max(2 ** max(n.bit_length() - 1 - 4, 0), granule)
    return int(math.ceil(n / step) * step)


@dataclasses.dataclass(frozen=True)
class Buckets:
    """Minimum sizes for the three bucketed dimensions; `exact=True` disables bucketing.

    `multiple`: sequence and patch-row lengths are also rounded up to a multiple of this (128 where
    attention is splash: its blocks tile the length; 1 elsewhere). `seq_max`: the configured
    maximum sequence length (None: no limit); padded lengths never exceed it."""

    seq_min: int = 16
    patch_min: int = 64
    rows_min: int = 1
    exact: bool = False
    multiple: int = 1
    seq_max: int | None = None

    def __post_init__(self):
        if self.multiple < 1:
            raise ConfigError(f"buckets.multiple must be >= 1, got {self.multiple}")
        if self.seq_max is not None and self.seq_max < 1:
            raise ConfigError(f"buckets.seq_max must be >= 1 or null, got {self.seq_max}")

    def for_attention(self, kernel: str) -> "Buckets":
        """These buckets for an attention kernel (`qwen3_vl.attention.resolve`'s answer): splash needs
        lengths in multiples of its 128-wide blocks; other kernels take any length."""
        if kernel != "splash" or self.exact:
            return self
        return dataclasses.replace(self, multiple=math.lcm(self.multiple, SPLASH_MULTIPLE))

    def _round(self, n):
        return int(math.ceil(n / self.multiple) * self.multiple)

    def seq(self, n):
        if self.exact:
            return n
        out = self._round(bucket(n, self.seq_min))
        if self.seq_max is not None and n <= self.seq_max:
            out = min(out, self._round(self.seq_max))
        return out

    def patches(self, n):
        return n if self.exact else self._round(bucket(n, self.patch_min))

    def rows(self, n):
        return n if self.exact else bucket(n, self.rows_min, granule=1)


# ------------------------------------------------------------------ vision host helpers
def interpolation_taps(h: int, w: int, side: int, merge: int):
    """Bilinear (align_corners) taps into the side x side position table, merge-block order.

    Returns (indices (h*w, 4) int32, weights (h*w, 4) float32), computed in float32 as
    transformers does.
    """
    within = np.arange(h * w)
    blocks_w = w // merge
    in_col = within % merge
    in_row = (within // merge) % merge
    block_col = (within // (merge * merge)) % blocks_w
    block_row = within // (merge * merge * blocks_w)
    row = block_row * merge + in_row
    col = block_col * merge + in_col

    def axis(index, size):
        index = index.astype(np.float32)
        src = index * np.float32(side - 1) / np.float32(max(size - 1, 1))
        floor = np.floor(src)
        offsets = np.arange(2, dtype=np.float32)
        taps = np.clip(floor[:, None].astype(np.int64) + offsets.astype(np.int64), 0, side - 1)
        weights = np.clip(1 - np.abs(src[:, None] - floor[:, None] - offsets), 0, None).astype(np.float32)
        return taps, weights

    ht, hw_ = axis(row, h)
    wt, ww = axis(col, w)
    idx = (ht[:, :, None] * side + wt[:, None, :]).reshape(-1, 4)
    wts = (hw_[:, :, None] * ww[:, None, :]).reshape(-1, 4)
    return idx.astype(np.int32), wts.astype(np.float32)


def rowcol_ids(h: int, w: int, merge: int) -> np.ndarray:
    """(h*w, 2) patch (row, col) in merge-block order, for the 2-D vision rotary."""
    hh, ww = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    shape = (h // merge, merge, w // merge, merge)
    hh = hh.reshape(shape).transpose(0, 2, 1, 3).ravel()
    ww = ww.reshape(shape).transpose(0, 2, 1, 3).ravel()
    return np.stack([hh, ww], -1).astype(np.int32)


def _check_grid(name: str, grid, pixels, patch_dim: int, merge: int):
    grid = np.asarray(grid, dtype=np.int64).reshape(-1, 3)
    if (grid <= 0).any():
        raise ValueError(f"{name}: every (t, h, w) must be positive, got {grid.tolist()}")
    if ((grid[:, 1] % merge) | (grid[:, 2] % merge)).any():
        raise ValueError(f"{name}: h and w must be multiples of spatial_merge_size={merge}, got {grid.tolist()}")
    pixels = np.asarray(pixels)
    pix_name = "pixel_values" if name == "image_grid_thw" else "pixel_values_videos"
    if pixels.ndim != 2 or pixels.shape[1] != patch_dim:
        raise ValueError(f"{pix_name} must be (patches, {patch_dim}), got {pixels.shape}")
    if int(grid.prod(-1).sum()) != pixels.shape[0]:
        raise ValueError(
            f"{name} describes {int(grid.prod(-1).sum())} patches but {pix_name} has {pixels.shape[0]} rows"
        )
    return grid, pixels


def frame_patch_counts(image_grid_thw=None, video_grid_thw=None, **_) -> list[int]:
    """Patches per attention segment (one per image frame / video frame group), in packing order."""
    sizes = []
    for grid in (image_grid_thw, video_grid_thw):
        if grid is not None:
            for t, h, w in np.asarray(grid).reshape(-1, 3):
                sizes += [int(h * w)] * int(t)
    return sizes


Shape = tuple[int, "tuple[int, int] | None"]  # (padded sequence length, vision (rows, row_len) or None)


def batches_shape(cfg: Qwen3VLConfig, batches: list[dict], buckets: Buckets = Buckets()) -> Shape:
    """The one padded shape that holds every one of these transformers-named batches."""
    seq = max(buckets.seq(np.asarray(b["input_ids"]).shape[1]) for b in batches)
    shapes = [vision_shape(cfg, s, buckets) for s in (frame_patch_counts(**b) for b in batches) if s]
    vision = (max(r for r, _ in shapes), max(n for _, n in shapes)) if shapes else None
    return seq, vision


def hosts_shape(cfg: Qwen3VLConfig, batches: list[dict], buckets: Buckets, mesh) -> Shape:
    """The one shape every host packs its share of a global batch to: the smallest holding
    every host's `batches`, with patch rows a multiple of the per-shard batch split (each data
    shard's patch rows are split over its batch devices like samples are). Every process calls it (a
    collective); with one process it is `batches_shape` with rows rounded up."""
    from ...sharding import batch_split_per_host, hosts_max

    seq, vision = batches_shape(cfg, batches, buckets)
    seq, rows, row_len = hosts_max((seq, *(vision or (0, 0))))
    multiple = batch_split_per_host(mesh)
    rows = -(-rows // multiple) * multiple
    return seq, ((rows, row_len) if rows else None)


def pack_chunks(cfg: Qwen3VLConfig, batches: list[dict], buckets: Buckets = Buckets(),
                shape: Shape | None = None) -> dict[str, np.ndarray]:
    """Several transformers-named batches packed to one shape (`shape`, or the smallest that
    holds them) and stacked on a leading chunk axis."""
    seq, vision = batches_shape(cfg, batches, buckets) if shape is None else shape
    packed = [pack_inputs(cfg, **b, buckets=buckets, pad_to=seq, vision=vision)[0] for b in batches]
    return {k: np.stack([p[k] for p in packed]) for k in packed[0]}


def host_share(cfg: Qwen3VLConfig, arrays: dict[str, np.ndarray], mesh, process_index: int) -> dict[str, np.ndarray]:
    """One host's packed batch as its share of the global batch `sharding.global_batch` builds.

    The hosts' patch rows become one global array whose rows the mesh hands out to the hosts'
    devices in its own order (`sharding.batch_rows`), so `visual_index` (into the merged tokens
    of this host's patch rows) is moved to the global patch row each local row lands on. Every
    host must pack the same vision shape (the global arrays need it anyway); hosts of one data
    shard (`sharding.data_shard`) pack the same samples and get the same global rows. Pure: given any
    `process_index`, the assignment can be checked for every host without running it.
    """
    from ...sharding import batch_rows, data_shard

    if "patches" not in arrays:
        return arrays
    rows, row_len = arrays["patches"].shape[-3:-1]
    per_row = row_len // cfg.vision.merge_unit
    shards = data_shard(mesh, process_index)[1]
    owned = batch_rows(mesh, rows * shards)[process_index]  # global row of each local row
    vi = arrays["visual_index"]
    safe = np.maximum(vi, 0)
    moved = owned[safe // per_row] * per_row + safe % per_row
    return dict(arrays, visual_index=np.where(vi >= 0, moved, vi).astype(vi.dtype))


def vision_shape(cfg: Qwen3VLConfig, frame_sizes: list[int], buckets: Buckets) -> tuple[int, int]:
    """(rows, row_len) that `pack_vision` would use for frames of these patch counts."""
    unit = cfg.vision.merge_unit
    row_len = int(math.ceil(buckets.patches(max(frame_sizes)) / unit) * unit)
    rows, offset = 1, 0
    for n in frame_sizes:
        if offset + n > row_len:
            rows, offset = rows + 1, 0
        offset += n
    return buckets.rows(rows), row_len


def pack_vision(cfg: Qwen3VLConfig, frames: list[tuple[np.ndarray, int, int]], buckets: Buckets,
                shape: tuple[int, int] | None = None):
    """Pack frames [(patches (h*w, C), h, w), ...] into rows; returns arrays and the merged index of each frame.

    `shape` forces (rows, row_len), e.g. to give several chunks of a step one shape.
    """
    v = cfg.vision
    unit = v.merge_unit
    natural = vision_shape(cfg, [p.shape[0] for p, _, _ in frames], buckets) if frames else (1, unit)
    rows, row_len = shape or natural
    if shape is not None and (row_len < natural[1] or row_len % unit):
        raise ValueError(f"forced patch-row length {row_len} cannot hold these frames (needs {natural[1]})")
    placements = []
    row, offset = 0, 0
    for p, _, _ in frames:
        n = p.shape[0]
        if offset + n > row_len:
            row, offset = row + 1, 0
        placements.append((row, offset))
        offset += n
    if frames and row + 1 > rows:
        raise ValueError(f"frames need {row + 1} patch rows, more than the forced {rows}")
    patches = np.zeros((rows, row_len, v.patch_dim), np.float32)
    segment = np.full((rows, row_len), -1, np.int32)
    pos_idx = np.zeros((rows, row_len, 4), np.int32)
    pos_w = np.zeros((rows, row_len, 4), np.float32)
    rowcol = np.zeros((rows, row_len, 2), np.int32)
    merged_index = []  # per frame: flat indices of its merged tokens in (rows * row_len/unit)
    for seg, ((p, h, w), (r, o)) in enumerate(zip(frames, placements)):
        n = p.shape[0]
        patches[r, o : o + n] = p
        segment[r, o : o + n] = seg
        idx, wts = interpolation_taps(h, w, v.grid_side, v.spatial_merge_size)
        pos_idx[r, o : o + n] = idx
        pos_w[r, o : o + n] = wts
        rowcol[r, o : o + n] = rowcol_ids(h, w, v.spatial_merge_size)
        start = (r * row_len + o) // unit
        merged_index.append(np.arange(start, start + n // unit))
    return (
        dict(patches=patches, segment_ids=segment, pos_idx=pos_idx, pos_w=pos_w, rowcol=rowcol),
        merged_index,
    )


def pack_inputs(
    cfg: Qwen3VLConfig,
    input_ids,
    attention_mask=None,
    pixel_values=None,
    image_grid_thw=None,
    pixel_values_videos=None,
    video_grid_thw=None,
    mm_token_type_ids=None,
    *,
    position_ids=None,
    buckets: Buckets = Buckets(),
    pad_to: int | None = None,
    vision: tuple[int, int] | None = None,
) -> tuple[dict[str, np.ndarray], dict]:
    """transformers-named numpy inputs -> (static model arrays, host info).

    Validates every cross-field invariant and names the field that breaks it. `pad_to` and
    `vision=(rows, row_len)` force the padded shapes (vision arrays are then present even
    for a text-only batch), so that several batches can share one compiled step.
    """
    input_ids = np.asarray(input_ids)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {input_ids.shape}")
    b, length = input_ids.shape
    if not np.issubdtype(input_ids.dtype, np.integer):
        raise ValueError(f"input_ids must be integers, got {input_ids.dtype}")
    if (input_ids < 0).any() or (input_ids >= cfg.text.vocab_size).any():
        raise ValueError(f"input_ids has ids outside [0, {cfg.text.vocab_size})")
    mask = np.ones((b, length), np.int32) if attention_mask is None else np.asarray(attention_mask).astype(np.int32)
    if mask.shape != (b, length):
        raise ValueError(f"attention_mask shape {mask.shape} != input_ids shape {(b, length)}")
    if buckets.seq_max is not None:
        tokens = (mask > 0).sum(-1)
        if length > buckets.seq_max:
            row = int(tokens.argmax())
            raise UserError(f"input row {row} has {int(tokens[row])} tokens (padded batch width {length}), over the "
                            f"configured maximum buckets.seq_max={buckets.seq_max}")
    image_tok = (input_ids == cfg.image_token_id) & (mask > 0)
    video_tok = (input_ids == cfg.video_token_id) & (mask > 0)
    if mm_token_type_ids is None:
        if pixel_values is not None or pixel_values_videos is not None:
            raise ValueError("mm_token_type_ids is required with pixel_values / pixel_values_videos")
        types = image_tok.astype(np.int32) + 2 * video_tok.astype(np.int32)
    else:
        types = np.asarray(mm_token_type_ids).astype(np.int32)
        if types.shape != (b, length):
            raise ValueError(f"mm_token_type_ids shape {types.shape} != input_ids shape {(b, length)}")
        expect = image_tok.astype(np.int32) + 2 * video_tok.astype(np.int32)
        if ((types != expect) & (mask > 0)).any():
            raise ValueError("mm_token_type_ids disagrees with the image/video placeholder tokens in input_ids")

    v = cfg.vision
    frames: list[tuple[np.ndarray, int, int]] = []
    token_counts = {}
    for name, pix_name, pixels, grid in (
        ("image_grid_thw", "pixel_values", pixel_values, image_grid_thw),
        ("video_grid_thw", "pixel_values_videos", pixel_values_videos, video_grid_thw),
    ):
        if (pixels is None) != (grid is None):
            raise ValueError(f"{pix_name} and {name} must be given together")
        token_counts[name] = 0
        if pixels is None:
            continue
        grid, pixels = _check_grid(name, grid, pixels, v.patch_dim, v.spatial_merge_size)
        start = 0
        for t, h, w in grid:
            for _ in range(t):
                frames.append((pixels[start : start + h * w].astype(np.float32), int(h), int(w)))
                start += h * w
        token_counts[name] = int(grid.prod(-1).sum()) // v.merge_unit
    if int(image_tok.sum()) != token_counts["image_grid_thw"]:
        raise ValueError(
            f"input_ids has {int(image_tok.sum())} image placeholder tokens (id {cfg.image_token_id}) but "
            f"image_grid_thw gives {token_counts['image_grid_thw']} image features"
        )
    if int(video_tok.sum()) != token_counts["video_grid_thw"]:
        raise ValueError(
            f"input_ids has {int(video_tok.sum())} video placeholder tokens (id {cfg.video_token_id}) but "
            f"video_grid_thw gives {token_counts['video_grid_thw']} video features"
        )

    if position_ids is None:
        positions, deltas = get_rope_index(
            input_ids, types, image_grid_thw, video_grid_thw, mask, v.spatial_merge_size
        )
    else:
        positions = np.asarray(position_ids)
        if positions.ndim == 2:
            positions = np.broadcast_to(positions[None], (3, b, length))
        if positions.shape != (3, b, length):
            raise ValueError(f"position_ids must be (3, batch, seq), got {positions.shape}")
        deltas = positions.max(axis=(0, 2)) + 1 - mask.sum(-1)

    seq = pad_to if pad_to is not None else buckets.seq(length)
    if seq < length:
        raise ValueError(f"sequence length {length} exceeds the padded length {seq}")
    pad = seq - length
    arrays = dict(
        input_ids=np.pad(input_ids.astype(np.int32), ((0, 0), (0, pad))),
        attention_mask=np.pad(mask, ((0, 0), (0, pad))),
        positions=np.pad(positions.astype(np.int32), ((0, 0), (0, 0), (0, pad))),
    )
    visual_index = np.full((b, seq), -1, np.int32)
    visual_rows = np.zeros(0, np.int64)
    if frames or vision is not None:
        packed, merged_index = pack_vision(cfg, frames, buckets, vision)
        arrays.update(packed)
        n_img_frames = sum(int(t) for t, _, _ in np.asarray(image_grid_thw).reshape(-1, 3)) if image_grid_thw is not None else 0
        img_rows = np.concatenate(merged_index[:n_img_frames]) if n_img_frames else np.zeros(0, np.int64)
        vid_rows = np.concatenate(merged_index[n_img_frames:]) if len(merged_index) > n_img_frames else np.zeros(0, np.int64)
        vi = visual_index[:, :length]
        vi[image_tok] = img_rows  # row-major over the batch, in input order, as transformers scatters
        vi[video_tok] = vid_rows
        visual_rows = np.concatenate([img_rows, vid_rows])
    arrays["visual_index"] = visual_index
    info = dict(batch=b, length=length, rope_deltas=deltas.astype(np.int32), n_frames=len(frames), visual_rows=visual_rows)
    return arrays, info
