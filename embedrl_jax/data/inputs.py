"""The one input builder: items -> transformers-named numpy batches for Qwen3-VL (numpy/PIL only).

An *item* is a plain dict (see :mod:`embedrl_jax.tcot` for the T-CoT parts)::

    {
        "text":        str,                      # query / candidate text
        "instruction": str,                      # optional; joined as "{instruction} {text}"
        "images":      [image, ...],             # path / HxWxC uint8 array / PIL image ("image": one image)
        "video":       [frame, ...],             # frames in playback order (each path / array / PIL)
        "tcot":        str | {"parts": [...]},   # a T-CoT completion, or parts from tcot.evidence_item
    }

Other keys are ignored, except misspelt media keys (any unknown key naming an image, video or
frame), which are an error so that pixels are never dropped silently.

Layout (method reference §3.2), rendered as the Qwen3-VL chat template renders a content list
(items concatenated with no separator)::

    mode="embed":    <|im_start|>user\\n{content}{suffix}<|im_end|>\\n<|im_start|>assistant\\n<emb><|im_end|>\\n
    mode="generate": <|im_start|>user\\n{content}<|im_end|>\\n<|im_start|>assistant\\n

``content`` in embed mode is: images, text, T-CoT parts -- or, for a video item: text, video
(or text, frame_1 ... frame_n as images with ``video_as_images=True``), T-CoT parts. In generate
mode (the Reasoner's prompts, §8) all media come first: images, video (or frames), then text,
then T-CoT parts if any. T-CoT parts are: the thinking text, the evidence images (crops at the
image budget, key frames at the frame budget), then the rethink/answer text.

Pixels
------
Images go through transformers' ``Qwen2VLImageProcessorPil`` with a per-call budget
``size={"shortest_edge": min_tokens * f**2, "longest_edge": max_tokens * f**2}``, ``f = patch *
merge`` (32 for Qwen3-VL): 128-768 tokens for images and evidence crops, 128-300 for video
frames and key frames (§10). Aspect ratios above 200 are an error naming the item.

Videos (default, ``video_as_images=False``) are a true Qwen3-VL video input:

- frames beyond ``num_frames`` are sampled uniformly (``round(linspace(0, n-1, num_frames))``);
  an odd count (more generally, one not divisible by the temporal patch) repeats the last frame;
- every frame is brought to the first frame's size (BICUBIC) and then resized by the image
  processor with the frame budget, so all frames share one grid ``(gh, gw)``;
- consecutive frame pairs share a patch (patch vectors in ``(C, Tp, P, P)`` order, merge-block
  order as the image processor produces): ``video_grid_thw = [frames / 2, gh, gw]``;
- each temporal group k is rendered as ``<{t_k:.1f} seconds><|vision_start|>`` + ``gh*gw/4``
  video pads + ``<|vision_end|>``.

Timestamp rule: the given frames are taken to be consecutive samples at ``video_fps`` (2 fps,
the rate Embed-RL samples at), so frame i is at ``i / video_fps`` seconds; after sub-sampling a
kept frame keeps its original index, and a group's time is the mean of its first and last
frame's times -- transformers' ``Qwen3VLProcessor._calculate_timestamps``. For 8 frames at 2 fps
the groups read ``<0.2 seconds>``, ``<1.2 seconds>``, ``<2.2 seconds>``, ``<3.2 seconds>``.

Text
----
``max_text_tokens`` truncates the item's own text (instruction + text) only, never the
template, the suffix or the T-CoT. Literal vision markers (``<|image_pad|>``, ``<|video_pad|>``,
``<|vision_start|>``, ``<|vision_end|>``) are removed from item and T-CoT text, as the method's
evaluation does, so the placeholder counts always match the pixels.

Batches are padded on ``padding_side`` (left by default, as evaluation does) with the
tokenizer's pad id; ``<emb>`` pooling looks the token up by id, so the side does not matter.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Mapping, Sequence

import numpy as np
from PIL import Image
from transformers import AutoTokenizer
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from embedrl_jax import tcot as tcot_lib
from embedrl_jax.errors import ConfigError
from embedrl_jax.fsutil import local_copy, require

__all__ = ["InputConfig", "ModelIds", "InputBuilder", "MAX_ASPECT_RATIO", "item_signature", "load_tokenizer",
           "load_image_processor"]

#: Qwen's smart_resize refuses more extreme images; we check first to name the item.
MAX_ASPECT_RATIO = 200.0

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
_KNOWN_KEYS = {"text", "instruction", "images", "image", "video", "tcot"}
_MEDIA_WORDS = ("image", "img", "video", "frame", "pixel")


@dataclasses.dataclass(frozen=True)
class InputConfig:
    """How items become model inputs. Pixel budgets are in merged LLM tokens (32x32 px each)."""

    image_min_tokens: int = 128
    image_max_tokens: int = 768
    frame_min_tokens: int = 128
    frame_max_tokens: int = 300
    num_frames: int = 8
    max_text_tokens: int | None = 480
    suffix: str = "Summarize the above content in one word:"
    emb_token: str = "<emb>"
    padding_side: str = "left"
    video_as_images: bool = False
    video_fps: float = 2.0  # rate the given frames were sampled at (timestamps only)

    def __post_init__(self):
        if self.padding_side not in ("left", "right"):
            raise ConfigError(f"padding_side must be 'left' or 'right', got {self.padding_side!r}")
        for lo, hi in (("image_min_tokens", "image_max_tokens"), ("frame_min_tokens", "frame_max_tokens")):
            a, b = getattr(self, lo), getattr(self, hi)
            if not (0 < a <= b):
                raise ConfigError(f"need 0 < {lo} <= {hi}, got {a} and {b}")
        if self.num_frames < 1:
            raise ConfigError(f"num_frames must be >= 1, got {self.num_frames}")
        if self.max_text_tokens is not None and self.max_text_tokens < 1:
            raise ConfigError(f"max_text_tokens must be >= 1 or None, got {self.max_text_tokens}")
        if self.video_fps <= 0:
            raise ConfigError(f"video_fps must be > 0, got {self.video_fps}")


@dataclasses.dataclass(frozen=True)
class ModelIds:
    """The token ids and patch geometry the builder needs from a model config."""

    image_token_id: int
    video_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int
    patch_size: int = 16
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2

    @property
    def factor(self) -> int:
        """Pixels per merged token along each side (32 for Qwen3-VL)."""
        return self.patch_size * self.spatial_merge_size

    @classmethod
    def from_config(cls, config) -> "ModelIds":
        """From a transformers Qwen3-VL config, embedrl_jax's Qwen3VLConfig, a config.json dict or a ModelIds."""
        if isinstance(config, ModelIds):
            return config

        def get(obj, name, default=None):
            if isinstance(obj, Mapping):
                return obj.get(name, default)
            return getattr(obj, name, default)

        vision = get(config, "vision_config")
        if vision is None:
            vision = get(config, "vision")  # embedrl_jax.models.qwen3_vl.config.Qwen3VLConfig
        if vision is None:
            raise ValueError("model config has no vision_config")
        ids = {k: get(config, k) for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")}
        missing = [k for k, v in ids.items() if v is None]
        if missing:
            raise ValueError(f"model config is missing {missing}")
        return cls(
            **{k: int(v) for k, v in ids.items()},
            patch_size=int(get(vision, "patch_size", 16)),
            spatial_merge_size=int(get(vision, "spatial_merge_size", 2)),
            temporal_patch_size=int(get(vision, "temporal_patch_size", 2)),
        )


# ------------------------------------------------------------------------------------ loading
def _fail(index, field, msg) -> ValueError:
    return ValueError(f"item {index}: field {field!r}: {msg}")


def _load_image(obj, index, field) -> Image.Image:
    """path / HxW[xC] uint8 array / PIL -> RGB PIL image, with errors naming the item and field."""
    if isinstance(obj, (str, os.PathLike)):
        path = os.fspath(obj)
        if not os.path.exists(path):
            raise _fail(index, field, f"image file {path} does not exist")
        try:
            with Image.open(path) as im:
                im.load()
                img = im.copy()
        except Exception as e:  # PIL raises several types for unreadable / corrupt files
            raise _fail(index, field, f"cannot read image file {path}: {type(e).__name__}: {e}") from e
    elif isinstance(obj, Image.Image):
        img = obj
    elif isinstance(obj, np.ndarray):
        arr = obj
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
            raise _fail(index, field, f"image arrays must be HxW or HxWxC with C in (1, 3, 4), got shape {obj.shape}")
        if arr.dtype != np.uint8:
            raise _fail(index, field, f"image arrays must be uint8, got {arr.dtype}")
        img = Image.fromarray(np.ascontiguousarray(arr))
    else:
        raise _fail(index, field, f"expected an image path, uint8 array or PIL image, got {type(obj).__name__}")
    w, h = img.size
    if w < 1 or h < 1:
        raise _fail(index, field, f"image has no pixels (size {w}x{h})")
    if max(w, h) / min(w, h) > MAX_ASPECT_RATIO:
        raise _fail(index, field, f"image aspect ratio {max(w, h) / min(w, h):.1f} ({w}x{h}) is over {MAX_ASPECT_RATIO:g}")
    if img.mode != "RGB":
        img = img.convert("RGB")
    return img


def _as_list(value) -> list:
    if value is None:
        return []
    if isinstance(value, (str, os.PathLike, Image.Image, np.ndarray)):
        return [value]
    return list(value)


def _images_of(item: Mapping) -> list:
    imgs = _as_list(item.get("images"))
    if item.get("image") is not None:
        imgs = _as_list(item["image"]) + imgs
    return imgs


def _tcot_image_count(tc) -> int:
    if isinstance(tc, Mapping):
        return sum(1 for p in tc.get("parts", ()) if isinstance(p, Mapping) and p.get("type") == "image")
    if isinstance(tc, (list, tuple)):
        return sum(1 for p in tc if isinstance(p, Mapping) and p.get("type") == "image")
    return 0


def item_signature(item: Mapping) -> tuple:
    """(kind, images, evidence images) without loading pixels: 'text' / 'image' / 'video' batching key.

    Evidence counts of unparsed T-CoT strings are estimated from the parsed JSON (crops can
    still be filtered out), which only affects how batches are grouped, never the result.
    """
    if not isinstance(item, Mapping):
        return ("invalid", 0, 0)
    n_img = len(_images_of(item))
    video = len(_as_list(item.get("video"))) > 0
    tc = item.get("tcot")
    if isinstance(tc, (str, bytes)) and tc:
        t = tcot_lib.parse(tc)
        n_ev = (len(t.boxes) if n_img else 0) + (len(t.key_frames) if video else 0) if t.evidence_ok else 0
    else:
        n_ev = _tcot_image_count(tc)
    kind = "video" if video else ("image" if n_img or n_ev else "text")
    return (kind, n_img, n_ev)


@dataclasses.dataclass
class _Parsed:
    text: str
    images: list  # PIL
    frames: list  # PIL, sampled, padded to a multiple of the temporal patch
    frame_index: list  # original index of every frame in `frames`
    n_frames: int  # sampled frames before the temporal-patch padding
    tcot_parts: list  # [{"type": "text", "text"} | {"type": "image", "image": PIL, "budget"}]


# ------------------------------------------------------------------------------------ builder
class InputBuilder:
    """Renders items with the Qwen3-VL chat layout and builds padded numpy batches.

    Args:
      tokenizer: a transformers tokenizer holding the Qwen vision specials (and ``<emb>`` for
        embed mode: the builder refuses to render an ``<emb>`` the tokenizer does not know).
      image_processor: a ``Qwen2VLImageProcessorPil`` (its own size is overridden per call).
      model_config_ids: a transformers Qwen3-VL config (or anything :meth:`ModelIds.from_config` takes).
      config: :class:`InputConfig`.
    """

    def __init__(self, tokenizer, image_processor, model_config_ids, config: InputConfig = InputConfig()):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.ids = ModelIds.from_config(model_config_ids)
        self.config = config
        ids = self.ids
        names = tokenizer.convert_ids_to_tokens(
            [ids.image_token_id, ids.video_token_id, ids.vision_start_token_id, ids.vision_end_token_id]
        )
        if any(n is None for n in names):
            raise ValueError(f"tokenizer does not know the model's vision token ids {ids}")
        self.image_pad, self.video_pad, self.vision_start, self.vision_end = names
        self.image_placeholder = self.vision_start + self.image_pad + self.vision_end
        self.video_placeholder = self.vision_start + self.video_pad + self.vision_end
        self._placeholder_re = re.compile(re.escape(self.image_placeholder) + "|" + re.escape(self.video_placeholder))
        self._strip_re = re.compile("|".join(re.escape(n) for n in names))
        for attr, want in (("patch_size", ids.patch_size), ("merge_size", ids.spatial_merge_size),
                           ("temporal_patch_size", ids.temporal_patch_size)):
            got = getattr(image_processor, attr, want)
            if got is not None and int(got) != want:
                raise ValueError(f"image processor {attr}={got} disagrees with the model's {want}")
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else (tokenizer.eos_token_id or 0))

    # ---------------------------------------------------------------- item parsing
    def _budget(self, budget: str) -> dict:
        c, f2 = self.config, self.ids.factor**2
        if budget == "frame":
            return {"shortest_edge": c.frame_min_tokens * f2, "longest_edge": c.frame_max_tokens * f2}
        return {"shortest_edge": c.image_min_tokens * f2, "longest_edge": c.image_max_tokens * f2}

    def _clean(self, text: str) -> str:
        return self._strip_re.sub("", text)

    def truncate(self, text: str) -> str:
        """The longest prefix of `text` within `max_text_tokens` tokens (cut at a token boundary)."""
        limit = self.config.max_text_tokens
        if limit is None or not text:
            return text
        try:
            enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        except (NotImplementedError, TypeError, ValueError):  # slow tokenizers have no offsets
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            return text if len(ids) <= limit else self.tokenizer.decode(ids[:limit])
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        if len(ids) <= limit:
            return text
        return text[: offsets[limit - 1][1]]

    def _sample_frames(self, n: int) -> tuple[list[int], int]:
        """(frame indices padded to a multiple of the temporal patch, count before padding)."""
        k = self.config.num_frames
        if n <= k:
            idx = list(range(n))
        else:
            idx = [int(i) for i in np.round(np.linspace(0, n - 1, k)).astype(int)]
        real = len(idx)
        tp = self.ids.temporal_patch_size
        while len(idx) % tp:
            idx.append(idx[-1])
        return idx, real

    def _parse(self, item, index) -> _Parsed:
        if not isinstance(item, Mapping):
            raise ValueError(f"item {index}: expected a dict, got {type(item).__name__}")
        for key in item:
            if key not in _KNOWN_KEYS and isinstance(key, str) and any(w in key.lower() for w in _MEDIA_WORDS):
                raise _fail(index, key, "unknown media key; use 'images' (list), 'image' or 'video'")
        texts = []
        for key in ("instruction", "text"):
            v = item.get(key)
            if v is None:
                continue
            if not isinstance(v, str):
                raise _fail(index, key, f"expected a string, got {type(v).__name__}")
            v = self._clean(v)
            if v:
                texts.append(v)
        text = self.truncate(" ".join(texts))
        images = [_load_image(x, index, f"images[{j}]") for j, x in enumerate(_images_of(item))]
        raw_frames = _as_list(item.get("video"))
        frame_index, n_frames = self._sample_frames(len(raw_frames)) if raw_frames else ([], 0)
        loaded = {}
        for i in dict.fromkeys(frame_index):
            loaded[i] = _load_image(raw_frames[i], index, f"video[{i}]")
        frames = [loaded[i] for i in frame_index]
        # key frames refer to the frames the Reasoner saw: the sampled ones, without the padding
        parts = self._tcot_parts(item.get("tcot"), images, frames[:n_frames], index)
        if not text and not images and not frames and not parts:
            raise ValueError(f"item {index}: empty item (no 'text', 'instruction', 'images', 'video' or 'tcot')")
        return _Parsed(text, images, frames, frame_index, n_frames, parts)

    def _tcot_parts(self, tc, images, frames, index) -> list[dict]:
        if tc is None:
            return []
        if isinstance(tc, (str, bytes)):
                raw = tcot_lib.evidence_parts(tc, first_image=images[0] if images else None, frames=frames or None)
        elif isinstance(tc, Mapping):
            if "parts" not in tc:
                raise _fail(index, "tcot", "a T-CoT dict must have 'parts' (see embedrl_jax.tcot.evidence_item)")
            raw = tc["parts"]
        elif isinstance(tc, (list, tuple)):
            raw = tc
        else:
            raise _fail(index, "tcot", f"expected a completion string or {{'parts': [...]}}, got {type(tc).__name__}")
        parts = []
        for k, p in enumerate(raw):
            field = f"tcot.parts[{k}]"
            if not isinstance(p, Mapping) or p.get("type") not in ("text", "image"):
                raise _fail(index, field, "a part must be {'type': 'text', 'text': ...} or {'type': 'image', 'image': ...}")
            if p["type"] == "text":
                t = p.get("text")
                if not isinstance(t, str):
                    raise _fail(index, field, f"text part needs a string 'text', got {type(t).__name__}")
                t = self._clean(t)
                if t:
                    parts.append({"type": "text", "text": t})
            else:
                budget = p.get("budget", "image")
                if budget not in ("image", "frame"):
                    raise _fail(index, field, f"budget must be 'image' or 'frame', got {budget!r}")
                parts.append({"type": "image", "image": _load_image(p.get("image"), index, field + ".image"),
                              "budget": budget})
        return parts

    # ---------------------------------------------------------------- rendering
    def _timestamps(self, frame_index: list[int]) -> list[float]:
        tp, fps = self.ids.temporal_patch_size, self.config.video_fps
        t = [i / fps for i in frame_index]
        return [(t[g] + t[g + tp - 1]) / 2 for g in range(0, len(t), tp)]

    def _render(self, p: _Parsed, mode: str) -> tuple[str, list[dict]]:
        if mode not in ("embed", "generate"):
            raise ValueError(f"mode must be 'embed' or 'generate', got {mode!r}")
        img_media = [{"type": "image", "image": im, "budget": "image"} for im in p.images]
        if p.frames and self.config.video_as_images:
            vid_media = [{"type": "image", "image": f, "budget": "frame"} for f in p.frames[: p.n_frames]]
            vid_text = self.image_placeholder * len(vid_media)
        elif p.frames:
            vid_media = [{"type": "video", "frames": p.frames, "frame_index": p.frame_index,
                          "timestamps": self._timestamps(p.frame_index)}]
            vid_text = self.video_placeholder
        else:
            vid_media, vid_text = [], ""
        cot_text, cot_media = "", []
        for part in p.tcot_parts:
            if part["type"] == "text":
                cot_text += part["text"]
            else:
                cot_text += self.image_placeholder
                cot_media.append(part)
        img_text = self.image_placeholder * len(img_media)
        if mode == "embed":
            content = img_text + p.text + vid_text + cot_text + self.config.suffix
            media = img_media + vid_media + cot_media
            emb = self.config.emb_token
            if self.tokenizer.convert_tokens_to_ids(emb) in (None, self.tokenizer.unk_token_id):
                raise ValueError(f"the tokenizer has no {emb!r} token; add it first (tokenizer.add_tokens([{emb!r}]))")
            chat = f"{IM_START}user\n{content}{IM_END}\n{IM_START}assistant\n{emb}{IM_END}\n"
        else:
            content = img_text + vid_text + p.text + cot_text
            media = img_media + vid_media + cot_media
            chat = f"{IM_START}user\n{content}{IM_END}\n{IM_START}assistant\n"
        return chat, media

    def render(self, item, *, mode: str = "embed", index: int = 0) -> tuple[str, list[dict]]:
        """(chat text with one placeholder per image/video, media in placeholder order).

        Media entries: ``{"type": "image", "image": PIL, "budget": "image" | "frame"}`` for each
        ``<|vision_start|><|image_pad|><|vision_end|>``, and ``{"type": "video", "frames": [PIL],
        "frame_index": [int], "timestamps": [float per temporal group]}`` for each
        ``<|vision_start|><|video_pad|><|vision_end|>``. `index` only labels error messages.
        """
        return self._render(self._parse(item, index), mode)

    # ---------------------------------------------------------------- pixels
    def process_image(self, image: Image.Image, budget: str = "image") -> tuple[np.ndarray, np.ndarray]:
        """(pixel_values (patches, C*Tp*P*P) float32, grid (3,) int64) for one image."""
        out = self.image_processor(images=[image], size=self._budget(budget), return_tensors="np")
        return np.asarray(out["pixel_values"], np.float32), np.asarray(out["image_grid_thw"], np.int64)[0]

    def process_video(self, frames: list[Image.Image]) -> tuple[np.ndarray, np.ndarray]:
        """(pixel_values_videos (groups*gh*gw, C*Tp*P*P) float32, grid [groups, gh, gw]) for one video."""
        tp, p = self.ids.temporal_patch_size, self.ids.patch_size
        if len(frames) % tp:
            raise ValueError(f"a video needs a multiple of {tp} frames, got {len(frames)}")
        size = frames[0].size
        same = [f if f.size == size else f.resize(size, Image.BICUBIC) for f in frames]
        out = self.image_processor(images=same, size=self._budget("frame"), return_tensors="np")
        pix = np.asarray(out["pixel_values"], np.float32)
        grids = np.asarray(out["image_grid_thw"], np.int64)
        _, gh, gw = (int(x) for x in grids[0])
        hw, n = gh * gw, len(frames)
        c = pix.shape[1] // (tp * p * p)
        # each processed frame repeats itself Tp times; keep one copy, then put Tp frames in a patch
        one = pix.reshape(n, hw, c, tp, p, p)[:, :, :, 0]  # (n, hw, C, P, P)
        grouped = one.reshape(n // tp, tp, hw, c, p, p).transpose(0, 2, 3, 1, 4, 5)  # (G, hw, C, Tp, P, P)
        return np.ascontiguousarray(grouped.reshape(n // tp * hw, c * tp * p * p)), np.array([n // tp, gh, gw], np.int64)

    # ---------------------------------------------------------------- batches
    def _expand(self, chat: str, media: list[dict], index: int, acc: dict) -> str:
        """Replace the i-th placeholder with its expanded tokens; collect the pixels in `acc`."""
        merge2 = self.ids.spatial_merge_size**2
        pieces, pos, k = [], 0, 0
        for m in self._placeholder_re.finditer(chat):
            if k >= len(media):
                raise RuntimeError(f"item {index}: more placeholders than media")
            entry = media[k]
            pieces.append(chat[pos:m.start()])
            if entry["type"] == "image":
                if m.group(0) != self.image_placeholder:
                    raise RuntimeError(f"item {index}: media {k} is an image but its placeholder is not")
                pix, grid = self.process_image(entry["image"], entry["budget"])
                acc["pixel_values"].append(pix)
                acc["image_grid_thw"].append(grid)
                pieces.append(self.vision_start + self.image_pad * (int(np.prod(grid)) // merge2) + self.vision_end)
            else:
                if m.group(0) != self.video_placeholder:
                    raise RuntimeError(f"item {index}: media {k} is a video but its placeholder is not")
                pix, grid = self.process_video(entry["frames"])
                acc["pixel_values_videos"].append(pix)
                acc["video_grid_thw"].append(grid)
                per_group = int(grid[1] * grid[2]) // merge2
                for ts in entry["timestamps"]:
                    pieces.append(f"<{ts:.1f} seconds>" + self.vision_start + self.video_pad * per_group + self.vision_end)
            pos = m.end()
            k += 1
        if k != len(media):
            raise RuntimeError(f"item {index}: {len(media)} media but {k} placeholders")
        pieces.append(chat[pos:])
        return "".join(pieces)

    def build(self, items: Sequence[Mapping], *, mode: str = "embed", pad_to_multiple: int | None = None) -> dict:
        """One padded batch in transformers' input names (numpy).

        ``input_ids``, ``attention_mask``, ``mm_token_type_ids`` (0 text, 1 image, 2 video), and
        when present ``pixel_values`` + ``image_grid_thw`` / ``pixel_values_videos`` +
        ``video_grid_thw`` (images and videos each in item order, then placeholder order).
        """
        if isinstance(items, Mapping):
            raise TypeError("build() takes a list of items; wrap a single item in a list")
        items = list(items)
        if not items:
            raise ValueError("build() needs at least one item")
        acc = {k: [] for k in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")}
        rows = []
        merge2 = self.ids.spatial_merge_size**2
        for i, item in enumerate(items):
            chat, media = self.render(item, mode=mode, index=i)
            n_img0 = sum(int(np.prod(g)) for g in acc["image_grid_thw"]) // merge2
            n_vid0 = sum(int(np.prod(g)) for g in acc["video_grid_thw"]) // merge2
            text = self._expand(chat, media, i, acc)
            ids = np.asarray(self.tokenizer(text, add_special_tokens=False)["input_ids"], np.int64)
            want_img = sum(int(np.prod(g)) for g in acc["image_grid_thw"]) // merge2 - n_img0
            want_vid = sum(int(np.prod(g)) for g in acc["video_grid_thw"]) // merge2 - n_vid0
            got_img = int((ids == self.ids.image_token_id).sum())
            got_vid = int((ids == self.ids.video_token_id).sum())
            if got_img != want_img or got_vid != want_vid:
                raise ValueError(
                    f"item {i}: tokenized text has {got_img} image / {got_vid} video pads, expected {want_img} / "
                    f"{want_vid} (does the tokenizer treat the vision pads as single tokens?)"
                )
            rows.append(ids)
        length = max(len(r) for r in rows)
        if pad_to_multiple:
            length = int(math.ceil(length / pad_to_multiple) * pad_to_multiple)
        input_ids = np.full((len(rows), length), self.pad_id, np.int64)
        mask = np.zeros((len(rows), length), np.int64)
        for i, r in enumerate(rows):
            sl = slice(length - len(r), length) if self.config.padding_side == "left" else slice(0, len(r))
            input_ids[i, sl] = r
            mask[i, sl] = 1
        types = ((input_ids == self.ids.image_token_id).astype(np.int64)
                 + 2 * (input_ids == self.ids.video_token_id).astype(np.int64)) * mask
        out = {"input_ids": input_ids, "attention_mask": mask, "mm_token_type_ids": types}
        if acc["pixel_values"]:
            out["pixel_values"] = np.concatenate(acc["pixel_values"]).astype(np.float32)
            out["image_grid_thw"] = np.stack(acc["image_grid_thw"]).astype(np.int64)
        if acc["pixel_values_videos"]:
            out["pixel_values_videos"] = np.concatenate(acc["pixel_values_videos"]).astype(np.float32)
            out["video_grid_thw"] = np.stack(acc["video_grid_thw"]).astype(np.int64)
        return out


def load_tokenizer(path, emb_token: str | None = None):
    """AutoTokenizer from `path` (a local directory or an object-store URL, read from a local copy
    of its small files: transformers reads local files); with `emb_token`, that token is added as
    an ordinary (non-special) token if absent (the Embedder's <emb> reuses a spare row of the
    embedding matrix)."""
    tok = AutoTokenizer.from_pretrained(str(local_copy(require(path, "tokenizer directory"), side_files_only=True)))
    if emb_token is not None and emb_token not in tok.get_vocab():
        tok.add_tokens([emb_token])
    return tok


def load_image_processor(path, model_config):
    """`Qwen2VLImageProcessorPil` from preprocessor_config.json, else one with the model's patch
    geometry and mean = std = 0.5 (Qwen3-VL's normalisation). Budgets are set per call anyway.
    `path` may be an object-store URL, as for `load_tokenizer`."""
    if require(path, "image processor directory").joinpath("preprocessor_config.json").exists():
        return Qwen2VLImageProcessorPil.from_pretrained(str(local_copy(path, side_files_only=True)))
    v = model_config.vision_config
    return Qwen2VLImageProcessorPil(
        patch_size=v.patch_size, temporal_patch_size=v.temporal_patch_size, merge_size=v.spatial_merge_size,
        image_mean=[0.5] * 3, image_std=[0.5] * 3,
    )
