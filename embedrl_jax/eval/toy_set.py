"""A small offline evaluation set in the official MMEB-V2 and UVRB layouts (no network).

:func:`make_toy_eval_set` writes a miniature local copy of MMEB-V2 under ``out_dir`` that the
readers of :mod:`embedrl_jax.eval.readers` read exactly as they read the real one, with real
task keys, so the aggregate file marks the other tasks missing as the official files do:

- image (``MMEB_Test_Instruct/<Task>/test.jsonl`` + ``image-tasks/<Task>/*.png``; per-query
  candidate lists, positive first): ``VOC2007`` (classification: colour and shape of one object),
  ``GQA`` (VQA: the colour of a named shape), ``MSCOCO_t2i`` and ``MSCOCO_i2t`` (retrieval between
  scene captions and scenes) and ``RefCOCO`` (grounding: the crop that isolates a named object,
  against the crops of the other objects of the scene and of other scenes);
- video (``video-annotations/<Task>/test.jsonl`` + ``video-tasks/frames/<group>/<Task>/<id>/``,
  12 frames per clip so the 8-frame choice is exercised): ``UCF101`` (classification of the
  motion over the global label pool) and ``MSR-VTT`` (caption -> clip over the global pool of
  all clips);
- visdoc (BEIR: ``visdoc-tasks/<Task>/{queries,corpus,qrels}/test.jsonl`` + ``images/<id>.png``):
  ``ViDoSeek-doc`` with graded qrels (the page holding the answer 3, the other pages of its
  document 2), documents of 3 pages;
- UVRB (``uvrb/MSRVTT/UVRB/MSRVTT/{jsonl,videos_frames}``): caption -> clip;
- ``tcot/<Task>/{query,candidate}.jsonl``: oracle T-CoTs written from the generating factors (boxes
  of the shapes, keywords, key frames) in the toy training set's T-CoT style, keyed as the official
  T-CoT files are, for ``embedrl eval mmeb --tcot DIR/tcot``.

Scenes are the toy training set's shapes (circles, squares, triangles in four colours). Output is
a pure function of the seed; the set is built in a local staging folder and published whole
(`fsutil.staged_dir`: a rename locally, upload + commit marker for an object-store `out_dir`).
"""
from __future__ import annotations

import json
import os

import numpy as np

from ..data.toy import COLORS, DIRECTIONS, SHAPES, _draw_shape, _image_tcot, _text_tcot, _video_tcot
from ..fsutil import as_path, is_published, is_remote, staged_dir

__all__ = ["make_toy_eval_set", "TOY_TASKS", "TOY_UVRB"]

TOY_TASKS = ("VOC2007", "GQA", "MSCOCO_t2i", "MSCOCO_i2t", "RefCOCO", "UCF101", "MSR-VTT", "ViDoSeek-doc")
TOY_UVRB = ("MSRVTT",)
VERSION = 2
N_FRAMES = 12


def _jsonl(path: str, rows) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def _scene(rng, objs, size):
    """objs: [(color, shape)] placed left to right; returns image and pixel boxes."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(225, 256, size=3)))
    draw = ImageDraw.Draw(img)
    n = len(objs)
    r = size * (0.3 / n if n > 1 else 0.25)
    boxes = []
    for k, (color, shape) in enumerate(objs):
        cx = size * (k + 0.5) / n + float(rng.uniform(-0.02, 0.02)) * size
        cy = size * 0.5 + float(rng.uniform(-0.1, 0.1)) * size
        boxes.append(_draw_shape(draw, shape, COLORS[color], cx, cy, r))
    return img, boxes


def _b1000(box, w, h):
    x1, y1, x2, y2 = box
    return [int(round(x1 * 1000 / w)), int(round(y1 * 1000 / h)), int(round(x2 * 1000 / w)), int(round(y2 * 1000 / h))]


def _slots(objs):
    slots = ["left", "right"] if len(objs) == 2 else ["left", "center", "right"] if len(objs) == 3 else ["center"]
    return [(c, s, slot) for (c, s), slot in zip(objs, slots)]


def _pairs(rng, n):
    combos = [(c, s) for c in COLORS for s in SHAPES]
    return [combos[int(i)] for i in rng.permutation(len(combos))[:n]]


def _build(root: str, seed: int, n: int, size: int) -> dict:
    rng = np.random.default_rng(seed)
    combos = [(c, s) for c in COLORS for s in SHAPES]
    counts = {}
    tq: dict[str, dict[str, str]] = {}  # task -> query key -> T-CoT
    tc: dict[str, dict[str, str]] = {}  # task -> candidate key -> T-CoT

    def cot(table, task, key, text):
        table.setdefault(task, {})[key] = text

    def label_cot(task, text):
        words = text.split()
        cot(tc, task, text, _text_tcot([(words[0], " ".join(words[1:]), "center")] if len(words) > 1
                                       else [(text, "", "center")], text))

    def save(img, task, name):
        rel = f"{task}/{name}.png"
        path = os.path.join(root, "image-tasks", rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        img.save(path)
        return rel

    # image classification: one object; labels are all 12 colour-shape names, positive first
    labels = [f"{c} {s}" for c, s in combos]
    rows = []
    for k in range(n):
        color, shape = combos[int(rng.integers(len(combos)))]
        img, boxes = _scene(rng, [(color, shape)], size)
        rel = save(img, "VOC2007", f"q{k:03d}")
        pos = f"{color} {shape}"
        cot(tq, "VOC2007", f"{rel}||", _image_tcot(_slots([(color, shape)]), [_b1000(boxes[0], size, size)],
                                                      f"a {color} {shape}"))
        rows.append({"qry_inst": "<|image_1|> Represent the given image for classification",
                     "qry_text": "", "qry_img_path": rel, "tgt_inst": "",
                     "tgt_text": [pos] + [lab for lab in labels if lab != pos], "tgt_img_path": [""] * len(labels)})
    for lab in labels:
        label_cot("VOC2007", lab)
    _jsonl(os.path.join(root, "MMEB_Test_Instruct", "VOC2007", "test.jsonl"), rows)
    counts["VOC2007"] = len(rows)

    # VQA: what colour is the <shape>? answers: the four colours, positive first
    rows = []
    for k in range(n):
        objs = _pairs(rng, 2)
        while objs[0][1] == objs[1][1]:
            objs = _pairs(rng, 2)
        img, boxes = _scene(rng, objs, size)
        rel = save(img, "GQA", f"q{k:03d}")
        j = int(rng.integers(2))
        color, shape = objs[j]
        cot(tq, "GQA", f"{rel}||What color is the {shape}?",
            _image_tcot(_slots([objs[j]]), [_b1000(boxes[j], size, size)], f"the {shape} is {color}"))
        answers = [color] + [c for c in COLORS if c != color]
        rows.append({"qry_inst": "<|image_1|> Represent the given image with the following question:",
                     "qry_text": f"What color is the {shape}?", "qry_img_path": rel, "tgt_inst": "",
                     "tgt_text": answers, "tgt_img_path": [""] * len(answers)})
    for c in COLORS:
        cot(tc, "GQA", c, _text_tcot([(c, "", "center")], c))
    _jsonl(os.path.join(root, "MMEB_Test_Instruct", "GQA", "test.jsonl"), rows)
    counts["GQA"] = len(rows)

    # retrieval between captions and scenes (2 objects); 8 candidates per query, positive first
    scenes = []
    for k in range(n):
        objs = _pairs(rng, 2)
        caption = f"a {objs[0][0]} {objs[0][1]} to the left of a {objs[1][0]} {objs[1][1]}"
        img, boxes = _scene(rng, objs, size)
        scenes.append((caption, save(img, "MSCOCO_t2i", f"s{k:03d}"), save(img, "MSCOCO_i2t", f"s{k:03d}")))
        image_cot = _image_tcot(_slots(objs), [_b1000(b, size, size) for b in boxes], caption)
        text_cot = _text_tcot(_slots(objs), caption)
        cot(tq, "MSCOCO_t2i", caption, text_cot)
        cot(tc, "MSCOCO_t2i", scenes[-1][1], image_cot)
        cot(tq, "MSCOCO_i2t", f"{scenes[-1][2]}||", image_cot)
        cot(tc, "MSCOCO_i2t", caption, text_cot)
    t2i, i2t = [], []
    for k, (caption, rel_t2i, rel_i2t) in enumerate(scenes):
        negs = [j for j in rng.permutation(n) if j != k][:7]
        t2i.append({"qry_inst": "Find me an everyday image that matches the given caption:", "qry_text": caption,
                    "qry_img_path": "", "tgt_inst": "<|image_1|> Represent the given image.",
                    "tgt_text": [""] * 8, "tgt_img_path": [rel_t2i] + [scenes[j][1] for j in negs]})
        i2t.append({"qry_inst": "<|image_1|> Find an image caption describing the given everyday image.",
                    "qry_text": "", "qry_img_path": rel_i2t, "tgt_inst": "",
                    "tgt_text": [caption] + [scenes[j][0] for j in negs], "tgt_img_path": [""] * 8})
    _jsonl(os.path.join(root, "MMEB_Test_Instruct", "MSCOCO_t2i", "test.jsonl"), t2i)
    _jsonl(os.path.join(root, "MMEB_Test_Instruct", "MSCOCO_i2t", "test.jsonl"), i2t)
    counts["MSCOCO_t2i"] = counts["MSCOCO_i2t"] = n

    # grounding: a 3-object scene; candidates are crops of its objects and of another scene's
    from PIL import Image

    crops_of = []
    for k in range(n):
        objs = _pairs(rng, 3)
        img, boxes = _scene(rng, objs, size)
        rel = save(img, "RefCOCO", f"q{k:03d}")
        crops = []
        for j, (box, obj) in enumerate(zip(boxes, objs)):
            crop = img.crop(tuple(max(0, v) for v in box)).resize((32, 32), Image.BICUBIC)
            crops.append((save(crop, "RefCOCO", f"q{k:03d}_crop{j}"), f"{obj[0]} {obj[1]}"))
            cot(tc, "RefCOCO", crops[-1][0], _image_tcot(_slots([obj]), [[100, 100, 900, 900]], f"a {obj[0]} {obj[1]}"))
        crops_of.append((rel, objs, crops, boxes))
    rows = []
    for k, (rel, objs, crops, boxes) in enumerate(crops_of):
        j = int(rng.integers(3))
        cot(tq, "RefCOCO", f"{rel}||{crops[j][1]}",
            _image_tcot(_slots([objs[j]]), [_b1000(boxes[j], size, size)], f"a {crops[j][1]}"))
        other = crops_of[(k + 1) % n][2]
        cands = [crops[j]] + [c for i, c in enumerate(crops) if i != j] + list(other)
        rows.append({"qry_inst": "<|image_1|> Select the portion of the image that isolates the object of the "
                                 "given label:", "qry_text": crops[j][1], "qry_img_path": rel,
                     "tgt_inst": "<|image_1|> Represent the given cropped image of the object.",
                     "tgt_text": [c[1] for c in cands], "tgt_img_path": [c[0] for c in cands]})
    _jsonl(os.path.join(root, "MMEB_Test_Instruct", "RefCOCO", "test.jsonl"), rows)
    counts["RefCOCO"] = len(rows)

    # videos: one shape moving in one of four directions
    def clip(folder, color, shape, direction):
        from PIL import Image, ImageDraw

        os.makedirs(folder, exist_ok=True)
        (x0, y0), (x1, y1) = DIRECTIONS[direction]
        bg = tuple(int(v) for v in rng.integers(225, 256, size=3))
        for f in range(N_FRAMES):
            t = f / (N_FRAMES - 1)
            img = Image.new("RGB", (size, size), bg)
            _draw_shape(ImageDraw.Draw(img), shape, COLORS[color], (x0 + t * (x1 - x0)) * size,
                        (y0 + t * (y1 - y0)) * size, size * 0.15)
            img.save(os.path.join(folder, f"frame_{f + 1}.png"))  # natural order: 1, 2, ..., 10, 11, 12

    dirs = list(DIRECTIONS)
    rows = []
    for k in range(n):
        color, shape = combos[int(rng.integers(len(combos)))]
        direction = dirs[int(rng.integers(len(dirs)))]
        vid = f"v{k:03d}"
        clip(os.path.join(root, "video-tasks", "frames", "video_cls", "UCF101", vid), color, shape, direction)
        rows.append({"video_id": vid, "pos_text": f"moving {direction}"})
        cot(tq, "UCF101", vid, _video_tcot(color, shape, direction, f"a {color} {shape} moving {direction}"))
    _jsonl(os.path.join(root, "video-annotations", "UCF101", "test.jsonl"), rows)
    for d in dirs:
        cot(tc, "UCF101", f"moving {d}", _text_tcot([("moving", d, "center")], f"moving {d}"))
    with open(os.path.join(root, "video-annotations", "UCF101", "labels.txt"), "w") as f:
        f.write("".join(f"moving {d}\n" for d in dirs))
    counts["UCF101"] = n
    all_clips = [(c, s, d) for c in COLORS for s in SHAPES for d in dirs]
    rows, uvrb_q, uvrb_c, uvrb_i = [], [], [], []
    for k, j in enumerate(rng.permutation(len(all_clips))[:n]):
        color, shape, direction = all_clips[int(j)]
        vid = f"video{k}"
        caption = f"a {color} {shape} moving {direction}"
        clip(os.path.join(root, "video-tasks", "frames", "video_ret", "MSR-VTT", vid), color, shape, direction)
        rows.append({"video_id": vid, "video": f"{vid}.mp4", "caption": caption})
        cot(tc, "MSR-VTT", vid, _video_tcot(color, shape, direction, caption))
        cot(tq, "MSR-VTT", caption, _text_tcot([(color, shape, direction)], caption))
        clip(os.path.join(root, "uvrb", "MSRVTT", "UVRB", "MSRVTT", "videos_frames", vid), color, shape, direction)
        uvrb_q.append({"id": f"q{k}", "text": caption})
        uvrb_c.append({"id": f"c{k}", "video": f"{vid}.mp4"})
        uvrb_i.append({"qid": f"q{k}", "pos": [f"c{k}"]})
    _jsonl(os.path.join(root, "video-annotations", "MSR-VTT", "test.jsonl"), rows)
    counts["MSR-VTT"] = n
    base = os.path.join(root, "uvrb", "MSRVTT", "UVRB", "MSRVTT", "jsonl")
    _jsonl(os.path.join(base, "queries.jsonl"), uvrb_q)
    _jsonl(os.path.join(base, "corpus.jsonl"), uvrb_c)
    _jsonl(os.path.join(base, "instances.jsonl"), uvrb_i)
    counts["uvrb/MSRVTT"] = n

    # visual documents: documents of 3 pages, one page per document holds a shape
    from PIL import ImageDraw

    base = os.path.join(root, "visdoc-tasks", "ViDoSeek-doc")
    os.makedirs(os.path.join(base, "images"))
    corpus, queries, qrels = [], [], []
    n_docs = max(2, n // 2)
    for d, (color, shape) in enumerate(_pairs(rng, min(n_docs, len(combos)))):
        answer_page = int(rng.integers(3))
        for p in range(3):
            cid = f"{d * 100 + p}"
            img = Image.new("RGB", (size, int(size * 1.4)), (250, 250, 250))
            draw = ImageDraw.Draw(img)
            for line in range(6):
                y = 8 + line * size // 8
                draw.line([(6, y), (size - 6, y)], fill=(90, 90, 90), width=2)
            if p == answer_page:
                _draw_shape(draw, shape, COLORS[color], size / 2, size, size * 0.2)
            else:
                draw.rectangle([size * 0.3, size * 0.85, size * 0.7, size * 1.15], outline=COLORS[color], width=3)
            img.save(os.path.join(base, "images", f"{cid}.png"))
            what = f"a {color} {shape}" if p == answer_page else f"an outlined {color} box"
            cot(tc, "ViDoSeek-doc", f"images/{cid}.png",
                _text_tcot([(color, shape if p == answer_page else "box", "center")], f"a report page showing {what}"))
            corpus.append({"corpus-id": cid})
            qrels.append({"query-id": f"q{d}", "corpus-id": cid, "score": 3 if p == answer_page else 2})
        queries.append({"query-id": f"q{d}", "query": f"Which report page shows the {color} {shape}?"})
        cot(tq, "ViDoSeek-doc", queries[-1]["query"], _text_tcot([(color, shape, "center")], f"a {color} {shape}"))
    qrels.append({"query-id": "q0", "corpus-id": "100", "score": 0})  # score 0: dropped as the loader does
    _jsonl(os.path.join(base, "queries", "test.jsonl"), queries)
    _jsonl(os.path.join(base, "corpus", "test.jsonl"), corpus)
    _jsonl(os.path.join(base, "qrels", "test.jsonl"), qrels)
    counts["ViDoSeek-doc"] = len(queries)
    for side, table in (("query", tq), ("candidate", tc)):
        for task, rows in table.items():
            _jsonl(os.path.join(root, "tcot", task, f"{side}.jsonl"), [{"key": k, "cot": v} for k, v in rows.items()])
    return counts


def make_toy_eval_set(out_dir, *, n: int = 24, seed: int = 0, size: int = 64, overwrite: bool = False) -> dict:
    """Build the toy evaluation set under `out_dir` (see the module docstring); returns the manifest
    ``{"config", "tasks", "uvrb", "counts"}`` (also ``out_dir/toy_eval.json``). An existing set with
    the same config is reused; a different one raises unless `overwrite`."""
    out_dir = os.fspath(out_dir) if is_remote(out_dir) else os.path.abspath(os.fspath(out_dir))
    cfg = {"n": n, "seed": seed, "size": size, "version": VERSION}
    if as_path(out_dir).exists():
        try:
            existing = json.loads((as_path(out_dir) / "toy_eval.json").read_text())
        except (OSError, ValueError):
            existing = None
        same = existing is not None and existing.get("config") == cfg
        if same and is_published(out_dir) and not overwrite:
            return existing
        if not overwrite and not same:  # a torn upload (object store) of this very set is rebuilt
            raise FileExistsError(f"{out_dir} exists and is not a toy evaluation set with this config; "
                                  "pass overwrite=True to replace it")
    if n < 2 or size < 32:
        raise ValueError("n must be >= 2 and size >= 32")
    with staged_dir(out_dir) as tmp:
        counts = _build(os.fspath(tmp), seed, n, size)
        manifest = {"config": cfg, "tasks": list(TOY_TASKS), "uvrb": list(TOY_UVRB), "counts": counts}
        (tmp / "toy_eval.json").write_text(json.dumps(manifest, indent=1))
    return manifest
