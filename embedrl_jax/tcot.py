"""T-CoT (Traceability CoT): parsing and evidence injection for the Embedder (method ref. §4, §5).

A T-CoT completion has the grammar::

    <thinking> short grounded steps ... {"<evidence_key>": <value>} </thinking>
    <rethink> re-check of the reasoning against the evidence </rethink>
    <answer> rephrased answer / description of the target </answer>

with exactly one flat JSON object inside ``<thinking>``; the key depends on what was reasoned about:
``text_keywords`` (list of strings), ``bbox_2d`` (one ``[x1, y1, x2, y2]`` box or a list of boxes on
Qwen3-VL's 0-1000 relative grid) or ``key_frames`` (frame numbers, 1-based as the prompts define
them).

This module is pure Python + numpy + PIL (no jax). It offers:

- :func:`parse` -- text -> :class:`TCoT` (never raises on ``str``/``bytes`` input);
- :func:`is_well_formed` -- the format-reward check (tags in order, non-greedy, DOTALL);
- :func:`crop_boxes` -- 0-1000 boxes -> pixel crops of the original image (size/aspect filtered);
- :func:`select_frames` -- 0-based key frames -> frames (out-of-range dropped);
- :func:`evidence_item` -- a completion -> the ``tcot`` parts of an Embedder item.

Prompt templates are data: see :mod:`embedrl_jax.prompts` (``load_prompts``, ``render``), re-exported
here.

Embedder item schema
--------------------
An *item* is a plain dict describing one Embedder input (one query or one candidate)::

    {
        "text":   str | None,            # instruction / query / candidate text
        "images": [image, ...],          # optional; image = PIL.Image or HxWxC uint8 array
                                         #   (a single "image" key is accepted as a one-image list)
        "video":  [frame, ...],          # optional; frames in playback order (PIL or HxWxC uint8)
        "tcot":   {"parts": [part, ...]} # optional; the parsed T-CoT, appended after the content
    }

where a *part* is one of::

    {"type": "text",  "text": str}
    {"type": "image", "image": PIL.Image, "budget": "image" | "frame"}

``budget`` selects the pixel budget the input builder resizes with (§10): ``"image"`` for evidence
crops (128-768 tokens), ``"frame"`` for key frames (<= 300 tokens). For a parseable T-CoT the parts
are, in order: ``"<thinking>{thinking}</thinking>\\n"``, the evidence images (crops of the first
image, then key frames), then the stripped text after ``</thinking>`` (rethink + answer). When the
completion has no thinking block, or no parseable flat JSON object inside it, the whole (stripped)
completion is a single text part; an empty completion gives no parts.

Corrections over the official code (§5.1): a flat ``bbox_2d`` box is wrapped as one box and
malformed boxes are skipped instead of crashing; key frames are converted from 1-based explicitly
(switchable with ``key_frames_one_based`` / :data:`KEY_FRAMES_ONE_BASED` for the ablation).
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from PIL import Image

from embedrl_jax.prompts import format_candidates, load_prompts, render

__all__ = [
    "TCoT",
    "parse",
    "is_well_formed",
    "crop_boxes",
    "select_frames",
    "evidence_parts",
    "evidence_item",
    "load_prompts",
    "render",
    "format_candidates",
    "KEY_FRAMES_ONE_BASED",
    "MIN_CROP_SIDE",
    "MAX_CROP_ASPECT",
    "GRID",
]

#: Module-level default for key-frame numbering in T-CoT JSON (the prompts ask for 1-based).
#: Set to False (or pass ``key_frames_one_based=False``) to reproduce the official 0-based parser.
KEY_FRAMES_ONE_BASED = True
#: Crops narrower or shorter than this many pixels are dropped.
MIN_CROP_SIDE = 10
#: Crops with max(w/h, h/w) above this are dropped.
MAX_CROP_ASPECT = 50
#: Qwen3-VL relative coordinate grid.
GRID = 1000

_TAGS = ("<thinking>", "</thinking>", "<rethink>", "</rethink>", "<answer>", "</answer>")
_FLAT_JSON = re.compile(r"\{[^{}]*\}")

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class TCoT:
    """A parsed T-CoT completion.

    Attributes:
      text: the input text (bytes decoded as UTF-8 with replacement).
      well_formed: thinking, rethink and answer blocks present in that order (format reward).
      has_thinking: a ``<thinking>...</thinking>`` block was found.
      thinking: the text inside the first thinking block (unstripped), or ``""``.
      rest: the stripped text after that block's ``</thinking>`` (rethink + answer); without a
        thinking block, the whole stripped text (the fallback text).
      evidence_json: the first flat ``{...}`` inside the thinking block, or None.
      json_ok: ``evidence_json`` parsed as a JSON object.
      keywords: strings from ``text_keywords``.
      boxes: ``(x1, y1, x2, y2)`` floats from ``bbox_2d``, clamped to [0, 1000], x1<=x2, y1<=y2.
      key_frames: 0-based frame indices from ``key_frames`` (unique, first-occurrence order,
        non-negative; an upper bound is applied only by :func:`select_frames`).
    """

    text: str = ""
    well_formed: bool = False
    has_thinking: bool = False
    thinking: str = ""
    rest: str = ""
    evidence_json: str | None = None
    json_ok: bool = False
    keywords: list[str] = field(default_factory=list)
    boxes: list[Box] = field(default_factory=list)
    key_frames: list[int] = field(default_factory=list)

    @property
    def evidence_ok(self) -> bool:
        """True when evidence can be injected: a thinking block holding a parseable JSON object."""
        return self.has_thinking and self.json_ok


# ----------------------------------------------------------------------------------------------
# Parsing
# ----------------------------------------------------------------------------------------------


def _as_text(text: Any) -> str:
    if isinstance(text, str):
        return text
    if isinstance(text, (bytes, bytearray, memoryview)):
        return bytes(text).decode("utf-8", errors="replace")
    if text is None:
        return ""
    raise TypeError(f"expected str or bytes, got {type(text).__name__}")


def is_well_formed(text: str | bytes) -> bool:
    """True if ``<thinking>…</thinking>``, ``<rethink>…</rethink>``, ``<answer>…</answer>`` occur in order.

    Same result as ``re.search(r"<thinking>.*?</thinking>.*?<rethink>.*?</rethink>.*?<answer>.*?</answer>",
    text, re.DOTALL)``, computed by a left-to-right scan (earliest match of each tag after the
    previous one), which is linear where the regex can backtrack polynomially on tag soups.
    """
    try:
        text = _as_text(text)
    except TypeError:
        return False
    pos = 0
    for tag in _TAGS:
        i = text.find(tag, pos)
        if i < 0:
            return False
        pos = i + len(tag)
    return True


def _thinking_block(text: str) -> tuple[str, str] | None:
    """(thinking, after) for the first ``<thinking>(.*?)</thinking>`` (DOTALL), or None."""
    start = text.find("<thinking>")
    if start < 0:
        return None
    body = start + len("<thinking>")
    end = text.find("</thinking>", body)
    if end < 0:
        return None
    return text[body:end], text[end + len("</thinking>"):]


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _finite_float(v: Any) -> float | None:
    if not _is_number(v):
        return None
    try:
        f = float(v)
    except (OverflowError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _clamp(v: float, lo: float, hi: float) -> float:
    return lo if v < lo else hi if v > hi else v


def _box_or_none(entry: Any) -> Box | None:
    """4 finite numbers -> ordered box clamped to the 0-1000 grid; anything else -> None."""
    if not isinstance(entry, (list, tuple)) or len(entry) != 4:
        return None
    vals = [_finite_float(v) for v in entry]
    if any(v is None for v in vals):
        return None
    x1, y1, x2, y2 = (_clamp(v, 0.0, float(GRID)) for v in vals)
    return (min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2))


def _normalize_boxes(value: Any) -> list[Box]:
    """``bbox_2d`` value -> list of boxes. A flat box of 4 numbers becomes a list of one box."""
    if not isinstance(value, (list, tuple)):
        return []
    if len(value) == 4 and all(_is_number(v) for v in value):
        value = [value]
    boxes = []
    for entry in value:
        box = _box_or_none(entry)
        if box is not None:
            boxes.append(box)
    return boxes


def _normalize_key_frames(value: Any, one_based: bool) -> list[int]:
    """``key_frames`` value -> unique non-negative 0-based indices in first-occurrence order."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, (list, tuple)):
        return []
    offset = 1 if one_based else 0
    seen: dict[int, None] = {}
    for v in value:
        if not isinstance(v, int) or isinstance(v, bool):
            continue
        k = v - offset
        if k >= 0:
            seen.setdefault(k, None)
    return list(seen)


def _normalize_keywords(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if not isinstance(value, (list, tuple)):
        return []
    return [v for v in value if isinstance(v, str)]


def parse(text: str | bytes, *, key_frames_one_based: bool | None = None) -> TCoT:
    """Parse a T-CoT completion. Never raises on ``str`` or ``bytes`` input.

    Args:
      text: the completion; bytes are decoded as UTF-8 with ``errors="replace"``; None is "".
      key_frames_one_based: interpret ``key_frames`` as 1-based (default
        :data:`KEY_FRAMES_ONE_BASED`); False treats them as 0-based (official-code ablation).
    """
    text = _as_text(text)
    one_based = KEY_FRAMES_ONE_BASED if key_frames_one_based is None else bool(key_frames_one_based)
    well_formed = is_well_formed(text)
    block = _thinking_block(text)
    if block is None:
        return TCoT(text=text, well_formed=well_formed, rest=text.strip())
    thinking, after = block
    m = _FLAT_JSON.search(thinking)
    evidence_json = m.group(0) if m else None
    obj = None
    if evidence_json is not None:
        try:
            obj = json.loads(evidence_json)
        except Exception:  # ValueError, RecursionError (deep arrays), int-digit limits, ...
            obj = None
    json_ok = isinstance(obj, dict)
    keywords: list[str] = []
    boxes: list[Box] = []
    key_frames: list[int] = []
    if json_ok:
        keywords = _normalize_keywords(obj.get("text_keywords"))
        boxes = _normalize_boxes(obj.get("bbox_2d"))
        key_frames = _normalize_key_frames(obj.get("key_frames"), one_based)
    return TCoT(
        text=text,
        well_formed=well_formed,
        has_thinking=True,
        thinking=thinking,
        rest=after.strip(),
        evidence_json=evidence_json,
        json_ok=json_ok,
        keywords=keywords,
        boxes=boxes,
        key_frames=key_frames,
    )


# ----------------------------------------------------------------------------------------------
# Evidence
# ----------------------------------------------------------------------------------------------


def _to_pil(image: Any) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, (str, os.PathLike)):
        with Image.open(image) as im:
            im.load()
            return im.copy()
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    return Image.fromarray(arr)


def _image_size(image: Any) -> tuple[int, int]:
    """(W, H) of a PIL image or an HxW[xC] array."""
    if isinstance(image, Image.Image):
        return image.size
    shape = np.shape(image)
    return int(shape[1]), int(shape[0])


def crop_boxes(
    image: Any,
    boxes: Iterable[Sequence[float]],
    *,
    min_side: int = MIN_CROP_SIDE,
    max_aspect: float = MAX_CROP_ASPECT,
) -> list[Image.Image]:
    """Crop 0-1000-grid boxes out of ``image`` (PIL or HxWxC uint8 array).

    Each box maps to pixels as ``x = int(v * W / 1000)``, ``y = int(v * H / 1000)``, is clamped to
    the image and has its corners ordered. A crop is kept only if its width and height are both
    >= ``min_side`` and ``max(w/h, h/w) <= max_aspect``. Crops come from the original image; boxes
    that are not 4 finite numbers are skipped.
    """
    if image is None:
        return []
    width, height = _image_size(image)
    pil = None
    crops = []
    for entry in boxes:
        box = _box_or_none(entry)  # validates; clamps the grid values to [0, 1000]
        if box is None:
            continue
        gx1, gy1, gx2, gy2 = box
        x1 = int(_clamp(int(gx1 * width / GRID), 0, width))
        x2 = int(_clamp(int(gx2 * width / GRID), 0, width))
        y1 = int(_clamp(int(gy1 * height / GRID), 0, height))
        y2 = int(_clamp(int(gy2 * height / GRID), 0, height))
        x1, x2 = min(x1, x2), max(x1, x2)
        y1, y2 = min(y1, y2), max(y1, y2)
        w, h = x2 - x1, y2 - y1
        if w < min_side or h < min_side or w <= 0 or h <= 0:
            continue
        if max(w / h, h / w) > max_aspect:
            continue
        if pil is None:
            pil = _to_pil(image)
        crops.append(pil.crop((x1, y1, x2, y2)))
    return crops


def select_frames(frames: Sequence[Any] | None, key_frames: Iterable[int]) -> list[Any]:
    """The frames at 0-based ``key_frames`` (out-of-range and repeated indices dropped)."""
    if not frames:
        return []
    n = len(frames)
    seen: dict[int, None] = {}
    for k in key_frames:
        if isinstance(k, (int, np.integer)) and not isinstance(k, bool) and 0 <= k < n:
            seen.setdefault(int(k), None)
    return [frames[k] for k in seen]


def evidence_parts(
    text: str | bytes | TCoT,
    *,
    first_image: Any = None,
    frames: Sequence[Any] | None = None,
    key_frames_one_based: bool | None = None,
    min_side: int = MIN_CROP_SIDE,
    max_aspect: float = MAX_CROP_ASPECT,
) -> list[dict]:
    """The T-CoT parts (§5 step 7) of a completion; see the module docstring for the layout."""
    t = text if isinstance(text, TCoT) else parse(text, key_frames_one_based=key_frames_one_based)
    whole = t.text.strip()
    if not whole:
        return []
    if not t.evidence_ok:
        return [{"type": "text", "text": whole}]
    parts: list[dict] = [{"type": "text", "text": f"<thinking>{t.thinking}</thinking>\n"}]
    if t.boxes and first_image is not None:
        for crop in crop_boxes(first_image, t.boxes, min_side=min_side, max_aspect=max_aspect):
            parts.append({"type": "image", "image": crop, "budget": "image"})
    if t.key_frames and frames:
        for frame in select_frames(frames, t.key_frames):
            parts.append({"type": "image", "image": _to_pil(frame), "budget": "frame"})
    if t.rest:
        parts.append({"type": "text", "text": t.rest})
    return parts


def evidence_item(
    item: Mapping[str, Any] | None,
    text: str | bytes | TCoT,
    *,
    first_image: Any = None,
    frames: Sequence[Any] | None = None,
    key_frames_one_based: bool | None = None,
    min_side: int = MIN_CROP_SIDE,
    max_aspect: float = MAX_CROP_ASPECT,
) -> dict:
    """Turn a completion into Embedder input.

    - ``item is None``: return the ``tcot`` dict ``{"parts": [...]}`` built from ``first_image``
      (source of ``bbox_2d`` crops) and ``frames`` (source of key frames).
    - ``item`` is an item dict (``{"text", "images"/"image", "video"}``): return a *new* dict equal to
      ``item`` with ``"tcot"`` set; ``first_image`` defaults to the item's first image and
      ``frames`` to its ``"video"``. The input dict is not modified.

    A missing thinking block or missing/malformed JSON gives one text part holding the whole
    completion; an empty completion gives no parts. Never raises on a malformed completion.
    """
    if item is not None and not isinstance(item, Mapping):
        raise TypeError(f"item must be a mapping or None, got {type(item).__name__}")
    if item is not None:
        if first_image is None:
            images = item.get("images")
            if images is not None and len(images) > 0:
                first_image = images[0]
            elif item.get("image") is not None:
                first_image = item["image"]
        if frames is None:
            frames = item.get("video")
    tcot = {
        "parts": evidence_parts(
            text,
            first_image=first_image,
            frames=frames,
            key_frames_one_based=key_frames_one_based,
            min_side=min_side,
            max_aspect=max_aspect,
        )
    }
    if item is None:
        return tcot
    out = dict(item)
    out["tcot"] = tcot
    return out
