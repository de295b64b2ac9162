"""A small offline retrieval set for tiny-model training and tests (no network).

:func:`make_toy_retrieval` writes, under ``out_dir``:

- ``images/real_*.png``: bundled real photos (``skimage.data`` and sklearn's two sample JPEGs),
  each with a hand-written caption, resized to a longer side of ``real_size`` px and a shorter side
  rounded to a multiple of 32. They go to the *train* split only.
- ``images/{split}_scene_*.png``: generated ``scene_size``² scenes of 1-3 shapes
  (circle/square/triangle in red/green/blue/yellow) laid out left/right/top/bottom, captioned from
  the scene ("a red circle to the left of a blue square"). Captions are unique across both splits,
  so held-out captions are unseen compositions.
- ``videos/{split}_clip_*/frame_1..8.png``: one shape moving across 8 frames ("a red circle moving
  left to right").
- MMEB-format JSONL (:func:`~embedrl_jax.data.records.read_mmeb`): ``toy_t2i_{split}.jsonl``
  (caption -> image) and ``toy_i2t_{split}.jsonl`` (image -> caption, query ``<|image_1|>`` +
  instruction).
- LLaVA-Hound JSON (:func:`~embedrl_jax.data.records.read_llavahound`):
  ``toy_video_retrieval_{split}.json`` (caption -> clip) and ``toy_caption_retrieval_{split}.json``
  (clip -> caption).
- ``manifest.json``: the config, counts and per-dataset files (relative to ``out_dir``).

About ``tcot_fraction`` of the shape/clip records carry T-CoTs in the method's format, with the
shape boxes as ``bbox_2d`` on the 0-1000 grid for image sides, ``text_keywords`` for text sides and
``key_frames`` (1-based) for clips. Output is a pure function of the arguments (byte-identical PNGs
and JSON for a seed). The set is built in a local staging folder and published whole
(:func:`~embedrl_jax.fsutil.staged_dir`: a rename locally; upload + commit marker for an
object-store ``out_dir`` such as ``gs://bucket/toy``); an existing ``out_dir`` with the same
config is reused, a different one raises unless ``overwrite``. The returned manifest's paths are
local files (for an object store, those of a local copy, :func:`~embedrl_jax.fsutil.local_copy`),
since the record readers and PIL read local files.
"""
from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from ..fsutil import as_path, is_published, is_remote, local_copy, staged_dir

__all__ = ["make_toy_retrieval", "load_toy_manifest", "REAL_IMAGES", "T2I_INSTRUCTION", "I2T_INSTRUCTION"]

MANIFEST_VERSION = 1
T2I_INSTRUCTION = "Find me an everyday image that matches the given caption: "
I2T_INSTRUCTION = "<|image_1|>\nFind an image caption describing the given everyday image."
VIDEO_QUERY_TURN = "<video>\nDescribe the content of the video."

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30)}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = {  # name -> (start (x, y), end (x, y)) as fractions of the frame
    "left to right": ((0.2, 0.5), (0.8, 0.5)),
    "right to left": ((0.8, 0.5), (0.2, 0.5)),
    "top to bottom": ((0.5, 0.2), (0.5, 0.8)),
    "bottom to top": ((0.5, 0.8), (0.5, 0.2)),
}
N_FRAMES = 8

# (name, loader spec, caption). All bundled with the wheels: no pooch downloads.
REAL_IMAGES: tuple[tuple[str, str, str], ...] = (
    ("astronaut", "skimage:astronaut", "an astronaut in a white spacesuit smiling in front of a flag"),
    ("coffee", "skimage:coffee", "a cup of coffee on a saucer with a spoon"),
    ("chelsea", "skimage:chelsea", "a tabby cat looking to the side"),
    ("rocket", "skimage:rocket", "a rocket standing on a launch pad under a blue sky"),
    ("camera", "skimage:camera", "a black and white photo of a man with a camera on a tripod"),
    ("coins", "skimage:coins", "a grayscale photo of rows of old coins"),
    ("moon", "skimage:moon", "a grayscale close-up of the cratered surface of the moon"),
    ("page", "skimage:page", "a scanned page of printed text"),
    ("hubble", "skimage:hubble_deep_field", "a deep space telescope image full of distant galaxies"),
    ("ihc", "skimage:immunohistochemistry", "a microscope image of stained tissue cells"),
    ("colorwheel", "skimage:colorwheel", "a circular color wheel showing a rainbow of hues"),
    ("china", "sklearn:china.jpg", "a traditional chinese temple roof behind a tree"),
    ("flower", "sklearn:flower.jpg", "a pink flower with yellow center in close-up"),
)


def _real_image(spec: str) -> np.ndarray:
    kind, name = spec.split(":", 1)
    # scikit-image / scikit-learn load only when the toy set is built (heavy imports for every data user)
    if kind == "skimage":
        import skimage.data

        arr = getattr(skimage.data, name)()
    else:
        from sklearn.datasets import load_sample_images

        imgs = load_sample_images()
        names = [os.path.basename(f) for f in imgs.filenames]
        arr = imgs.images[names.index(name)]
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    return np.ascontiguousarray(arr[..., :3])


def _round32(v: float) -> int:
    return max(32, int(round(v / 32.0)) * 32)


def _resize_real(arr: np.ndarray, longer: int):
    h, w = arr.shape[:2]
    if w >= h:
        size = (longer, _round32(longer * h / w))
    else:
        size = (_round32(longer * w / h), longer)
    return Image.fromarray(arr).resize(size, Image.BICUBIC)


def _box_1000(box, w: int, h: int) -> list[int]:
    x1, y1, x2, y2 = box
    return [int(round(x1 * 1000 / w)), int(round(y1 * 1000 / h)), int(round(x2 * 1000 / w)),
            int(round(y2 * 1000 / h))]


def _draw_shape(draw, shape: str, color, cx: float, cy: float, r: float) -> tuple[int, int, int, int]:
    box = (int(round(cx - r)), int(round(cy - r)), int(round(cx + r)), int(round(cy + r)))
    if shape == "circle":
        draw.ellipse(box, fill=color)
    elif shape == "square":
        draw.rectangle(box, fill=color)
    else:
        draw.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) / 2, box[1])], fill=color)
    return box


def _phrase(color: str, shape: str) -> str:
    return f"a {color} {shape}"


def _sample_scene(rng: np.random.Generator) -> tuple[list[tuple[str, str, str]], str]:
    """[(color, shape, slot)], caption. Slots: left/right/top/bottom/center."""
    n = int(rng.integers(1, 4))
    objs = []
    while len(objs) < n:
        o = (str(rng.choice(list(COLORS))), str(rng.choice(SHAPES)))
        if o not in objs:  # distinct objects keep captions unambiguous
            objs.append(o)
    if n == 1:
        slot = str(rng.choice(["left", "right", "top", "bottom"]))
        where = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom"}
        return [(*objs[0], slot)], f"{_phrase(*objs[0])} {where[slot]}"
    if n == 2:
        if rng.random() < 0.5:
            return ([(*objs[0], "left"), (*objs[1], "right")],
                    f"{_phrase(*objs[0])} to the left of {_phrase(*objs[1])}")
        return ([(*objs[0], "top"), (*objs[1], "bottom")], f"{_phrase(*objs[0])} above {_phrase(*objs[1])}")
    return ([(*objs[0], "left"), (*objs[1], "center"), (*objs[2], "right")],
            f"{_phrase(*objs[0])}, {_phrase(*objs[1])} and {_phrase(*objs[2])} from left to right")


def _render_scene(objs, size: int, rng: np.random.Generator):
    bg = tuple(int(v) for v in rng.integers(225, 256, size=3))
    img = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(img)
    n = len(objs)
    r = size * (0.12 if n == 3 else 0.18)
    jx, jy = (size * 0.02, size * 0.08) if n == 3 else (size * 0.04, size * 0.04)
    centers = {"left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25), "bottom": (0.5, 0.75),
               "center": (0.5, 0.5)}
    if n == 3:
        centers.update(left=(0.2, 0.5), right=(0.8, 0.5))
    boxes = []
    for color, shape, slot in objs:
        fx, fy = centers[slot]
        cx = fx * size + float(rng.uniform(-jx, jx))
        cy = fy * size + float(rng.uniform(-jy, jy))
        boxes.append(_draw_shape(draw, shape, COLORS[color], cx, cy, r))
    return img, [_box_1000(b, size, size) for b in boxes]


def _image_tcot(objs, boxes, caption: str) -> str:
    names = [_phrase(c, s) for c, s, _ in objs]
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    bbox = boxes[0] if len(boxes) == 1 else boxes
    return (f"<thinking>The image is a plain background with {listed}. "
            f"Their positions give the layout of the scene. {json.dumps({'bbox_2d': bbox})}</thinking>"
            f"<rethink>The boxes cover {listed} and their order matches the layout.</rethink>"
            f"<answer>{caption}</answer>")


def _text_tcot(objs, caption: str) -> str:
    kw = [f"{c} {s}" for c, s, _ in objs] + sorted({slot for _, _, slot in objs})
    return (f"<thinking>The text describes {caption}. The key objects and positions are listed. "
            f"{json.dumps({'text_keywords': kw})}</thinking>"
            f"<rethink>The keywords keep every object and its position.</rethink>"
            f"<answer>an image showing {caption}</answer>")


def _video_tcot(color: str, shape: str, direction: str, caption: str) -> str:
    start, end = direction.split(" to ")
    return (f"<thinking>In frame 1 the {color} {shape} is at the {start}; in frame {N_FRAMES} it has reached "
            f"the {end}. {json.dumps({'key_frames': [1, N_FRAMES]})}</thinking>"
            f"<rethink>The first and last frames show the whole motion of one {color} {shape}.</rethink>"
            f"<answer>{caption}</answer>")


def _config(n_train, n_heldout, n_video_train, n_video_heldout, seed, scene_size, real_size, tcot_fraction):
    return {"n_train": n_train, "n_heldout": n_heldout, "n_video_train": n_video_train,
            "n_video_heldout": n_video_heldout, "seed": seed, "scene_size": scene_size,
            "real_size": real_size, "tcot_fraction": tcot_fraction, "version": MANIFEST_VERSION}


def _write_jsonl(path: str, rows) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n")


def _write_json(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, sort_keys=True, indent=1)
        f.write("\n")


def _build(tmp: str, cfg: dict) -> dict:
    root_rng = np.random.default_rng(cfg["seed"])
    os.makedirs(os.path.join(tmp, "images"))
    os.makedirs(os.path.join(tmp, "videos"))
    S = cfg["scene_size"]
    frac = cfg["tcot_fraction"]
    datasets: dict[str, dict[str, Any]] = {}
    n_images = 0
    used_captions: set[str] = set()

    for split, n_scenes, n_clips in (("train", cfg["n_train"], cfg["n_video_train"]),
                                     ("heldout", cfg["n_heldout"], cfg["n_video_heldout"])):
        t2i, i2t = [], []
        if split == "train":
            for name, spec, caption in REAL_IMAGES:
                rel = f"images/real_{name}.png"
                _resize_real(_real_image(spec), cfg["real_size"]).save(os.path.join(tmp, rel))
                n_images += 1
                t2i.append({"qry": T2I_INSTRUCTION + caption, "qry_image_path": "", "pos_text": "",
                            "pos_image_path": rel, "neg_text": "", "neg_image_path": "",
                            "query_cot": "", "pos_cot": ""})
                i2t.append({"qry": I2T_INSTRUCTION, "qry_image_path": rel, "pos_text": caption,
                            "pos_image_path": "", "neg_text": "", "neg_image_path": "",
                            "query_cot": "", "pos_cot": ""})
        for k in range(n_scenes):
            for _ in range(10_000):
                objs, caption = _sample_scene(root_rng)
                if caption not in used_captions:
                    break
            else:  # pragma: no cover - the caption space has ~2000 entries
                raise ValueError("could not draw a new unique scene caption; lower n_train/n_heldout")
            used_captions.add(caption)
            img, boxes = _render_scene(objs, S, root_rng)
            rel = f"images/{split}_scene_{k:04d}.png"
            img.save(os.path.join(tmp, rel))
            n_images += 1
            with_cot = bool(root_rng.random() < frac)
            text_cot = _text_tcot(objs, caption) if with_cot else ""
            image_cot = _image_tcot(objs, boxes, caption) if with_cot else ""
            t2i.append({"qry": T2I_INSTRUCTION + caption, "qry_image_path": "", "pos_text": "",
                        "pos_image_path": rel, "neg_text": "", "neg_image_path": "",
                        "query_cot": text_cot, "pos_cot": image_cot})
            i2t.append({"qry": I2T_INSTRUCTION, "qry_image_path": rel, "pos_text": caption,
                        "pos_image_path": "", "neg_text": "", "neg_image_path": "",
                        "query_cot": image_cot, "pos_cot": text_cot})
        for task, rows in (("t2i", t2i), ("i2t", i2t)):
            name = f"toy_{task}_{split}"
            _write_jsonl(os.path.join(tmp, f"{name}.jsonl"), rows)
            datasets[name] = {"file": f"{name}.jsonl", "format": "mmeb", "task": task, "split": split,
                              "count": len(rows), "is_video": False}

        # Videos: one shape moving in one of four directions; (color, shape, direction) is unique.
        vret, vcap = [], []
        combos = [(c, s, d) for c in COLORS for s in SHAPES for d in DIRECTIONS]
        for k in range(n_clips):
            remaining = [c for c in combos if f"a {c[0]} {c[1]} moving {c[2]}" not in used_captions]
            if not remaining:
                raise ValueError(f"at most {len(combos)} toy clips in total; lower n_video_*")
            color, shape, direction = remaining[int(root_rng.integers(len(remaining)))]
            caption = f"a {color} {shape} moving {direction}"
            used_captions.add(caption)
            (x0, y0), (x1, y1) = DIRECTIONS[direction]
            bg = tuple(int(v) for v in root_rng.integers(225, 256, size=3))
            clip = f"videos/{split}_clip_{k:03d}"
            os.makedirs(os.path.join(tmp, clip))
            frames = []
            for f in range(N_FRAMES):
                t = f / (N_FRAMES - 1)
                img = Image.new("RGB", (S, S), bg)
                _draw_shape(ImageDraw.Draw(img), shape, COLORS[color], (x0 + t * (x1 - x0)) * S,
                            (y0 + t * (y1 - y0)) * S, S * 0.15)
                rel = f"{clip}/frame_{f + 1}.png"
                img.save(os.path.join(tmp, rel))
                frames.append(rel)
            n_images += N_FRAMES
            with_cot = bool(root_rng.random() < frac)
            vcot = _video_tcot(color, shape, direction, caption) if with_cot else ""
            tcot = (f"<thinking>The text describes {caption}. "
                    f"{json.dumps({'text_keywords': [f'{color} {shape}', direction]})}</thinking>"
                    f"<rethink>The keywords keep the object and its motion.</rethink>"
                    f"<answer>a video of {caption}</answer>") if with_cot else ""
            vret.append({"dataset_name": f"toy_video_retrieval_{split}",
                         "qry": {"conversations": [{"from": "human", "value": VIDEO_QUERY_TURN},
                                                   {"from": "gpt", "value": caption}], "video": []},
                         "pos": {"conversations": [{"from": "human", "value": "<video>"},
                                                   {"from": "gpt", "value": ""}], "video": frames},
                         "query_cot": tcot, "pos_cot": vcot})
            vcap.append({"dataset_name": f"toy_caption_retrieval_{split}",
                         "qry": {"conversations": [{"from": "human", "value": VIDEO_QUERY_TURN},
                                                   {"from": "gpt", "value": caption}], "video": frames},
                         "pos": {"conversations": [{"from": "human", "value": VIDEO_QUERY_TURN},
                                                   {"from": "gpt", "value": caption}], "video": []},
                         "query_cot": vcot, "pos_cot": tcot})
        for task, rows in (("video_retrieval", vret), ("caption_retrieval", vcap)):
            name = f"toy_{task}_{split}"
            _write_json(os.path.join(tmp, f"{name}.json"), rows)
            datasets[name] = {"file": f"{name}.json", "format": "llavahound", "task": task, "split": split,
                              "count": len(rows), "is_video": True}

    manifest = {"config": cfg, "datasets": datasets, "counts": {
        "images": n_images, "real_images": len(REAL_IMAGES),
        "train_pairs": sum(d["count"] for d in datasets.values() if d["split"] == "train"),
        "heldout_pairs": sum(d["count"] for d in datasets.values() if d["split"] == "heldout")}}
    _write_json(os.path.join(tmp, "manifest.json"), manifest)
    return manifest


def _with_paths(manifest: dict, out_dir: str) -> dict:
    root = os.path.abspath(out_dir)
    m = json.loads(json.dumps(manifest))
    m["root"] = root
    m["manifest"] = os.path.join(root, "manifest.json")
    for d in m["datasets"].values():
        d["path"] = os.path.join(root, d["file"])
    return m


def load_toy_manifest(out_dir) -> dict:
    """Read ``out_dir/manifest.json``; adds ``root``, ``manifest`` and each dataset's absolute ``path``
    (for an object-store ``out_dir``: of its local copy, made or refreshed here)."""
    root = os.fspath(local_copy(out_dir))
    with open(os.path.join(root, "manifest.json"), encoding="utf-8") as f:
        return _with_paths(json.load(f), root)


def _existing_config(out_dir: str):
    """The config of the toy set already at `out_dir` (None: none there, or unreadable). An
    object-store copy counts once published; a torn upload of the same set reads as (None, its config)."""
    manifest = as_path(out_dir) / "manifest.json"
    try:
        config = json.loads(manifest.read_text()).get("config")
    except (OSError, ValueError, AttributeError):
        return None, None
    return (config, config) if is_published(out_dir) else (None, config)


def make_toy_retrieval(out_dir, *, n_train: int = 96, n_heldout: int = 32, n_video_train: int = 8,
                       n_video_heldout: int = 4, seed: int = 0, scene_size: int = 64, real_size: int = 96,
                       tcot_fraction: float = 0.5, overwrite: bool = False) -> dict:
    """Build the toy retrieval set under ``out_dir`` (see the module docstring) and return its manifest.

    The manifest (also ``out_dir/manifest.json``, whose paths are relative) is::

        {"config": {...}, "counts": {"images", "real_images", "train_pairs", "heldout_pairs"},
         "datasets": {name: {"file", "path" (absolute), "format": "mmeb"|"llavahound",
                             "task", "split": "train"|"heldout", "count", "is_video"}},
         "root": the local directory read (out_dir, or its local copy for an object store),
         "manifest": abs manifest path}

    Datasets: ``toy_t2i_{split}``, ``toy_i2t_{split}`` (``n_train`` scenes + 13 real images in train,
    ``n_heldout`` scenes in heldout), ``toy_video_retrieval_{split}``,
    ``toy_caption_retrieval_{split}`` (``n_video_{split}`` clips; at most 48 clips in total).
    """
    out_dir = os.fspath(out_dir) if is_remote(out_dir) else os.path.abspath(os.fspath(out_dir))
    if scene_size < 32 or real_size < 32:
        raise ValueError("scene_size and real_size must be >= 32")
    if min(n_train, n_heldout, n_video_train, n_video_heldout) < 0:
        raise ValueError("counts must be >= 0")
    cfg = _config(n_train, n_heldout, n_video_train, n_video_heldout, seed, scene_size, real_size,
                  float(tcot_fraction))
    if as_path(out_dir).exists():
        existing, torn = _existing_config(out_dir)
        if existing == cfg and not overwrite:
            return load_toy_manifest(out_dir)
        if not overwrite and torn != cfg:  # a torn upload of this very set is simply rebuilt
            raise FileExistsError(f"{out_dir} exists and does not hold a toy set with this config; "
                                  "pass overwrite=True to replace it")
    with staged_dir(out_dir) as tmp:
        _build(os.fspath(tmp), cfg)
    # what was just published, read back: the same manifest (key order included, which orders
    # the datasets) as every later run, or another host, gets from the directory
    return load_toy_manifest(out_dir)
