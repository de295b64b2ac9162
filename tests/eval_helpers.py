"""Test encoders for the evaluation harness: an informative one built by hand from the toy set's
generating factors (colour, shape and motion words; pixel colours and motion), and a random one;
chance levels and the toy-evaluation run used on a trained toy Embedder."""
import hashlib
import json

import numpy as np
from PIL import Image

from embedrl_jax.data.toy import COLORS, DIRECTIONS, SHAPES
from embedrl_jax.eval.mmeb import evaluate
from embedrl_jax.eval.readers import read_task
from embedrl_jax.eval.tasks import TASKS

# the image tasks of the toy evaluation set a t2i-trained toy Embedder is scored on (the video and
# document tasks add compile time, not evidence)
IMAGE_TASKS = ("VOC2007", "GQA", "MSCOCO_t2i", "MSCOCO_i2t")

WORDS = list(COLORS) + list(SHAPES) + list(DIRECTIONS)
NOISE = 16


def _tail(p) -> str:
    return "/".join(str(p).replace("\\", "/").split("/")[-3:])  # independent of where the set lives


def _seed(item) -> int:
    view = {"text": item.get("text"), "tcot": item.get("tcot"),
            "media": [_tail(p) for p in (item.get("images") or []) + (item.get("video") or [])]}
    blob = json.dumps(view, sort_keys=True, default=str)
    return int(hashlib.sha1(blob.encode()).hexdigest()[:8], 16)


def _colour_fractions(path) -> np.ndarray:
    arr = np.asarray(Image.open(path).convert("RGB"), np.float32)
    out = []
    for rgb in COLORS.values():
        out.append(float((np.abs(arr - np.asarray(rgb, np.float32)).sum(-1) < 60).mean()))
    return np.asarray(out) / max(sum(out), 1e-6)


FILL = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}


def _shapes(path) -> np.ndarray:
    """Shape votes from how much of each colour blob's bounding box it fills."""
    arr = np.asarray(Image.open(path).convert("RGB"), np.float32)
    out = np.zeros(len(SHAPES))
    for rgb in COLORS.values():
        mask = np.abs(arr - np.asarray(rgb, np.float32)).sum(-1) < 60
        if mask.sum() < 12:
            continue
        ys, xs = np.nonzero(mask)
        fill = mask.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
        out[int(np.argmin([abs(fill - FILL[s]) for s in SHAPES]))] += 1.0
    return out / max(out.sum(), 1.0)


def _centroid(path) -> np.ndarray:
    arr = np.asarray(Image.open(path).convert("RGB"), np.float32)
    mask = arr.min(-1) < 200
    ys, xs = np.nonzero(mask)
    return np.array([xs.mean() / arr.shape[1], ys.mean() / arr.shape[0]]) if len(xs) else np.array([0.5, 0.5])


def features(item) -> np.ndarray:
    v = np.zeros(len(WORDS))
    text = (item.get("text") or "") + " " + (item.get("tcot") or "")
    for i, w in enumerate(WORDS):
        if w in text:
            v[i] += 1.0
    for path in item.get("images") or []:
        v[: len(COLORS)] += _colour_fractions(path)
        v[len(COLORS): len(COLORS) + len(SHAPES)] += _shapes(path)
    frames = item.get("video") or []
    if frames:
        v[: len(COLORS)] += _colour_fractions(frames[0])
        (x0, y0), (x1, y1) = _centroid(frames[0]), _centroid(frames[-1])
        name = ("left to right" if x1 > x0 else "right to left") if abs(x1 - x0) > abs(y1 - y0) else \
            ("top to bottom" if y1 > y0 else "bottom to top")
        v[len(COLORS) + len(SHAPES) + list(DIRECTIONS).index(name)] += 1.0
    return v


def informative_encode(items) -> np.ndarray:
    out = []
    for item in items:
        noise = np.random.default_rng(_seed(item)).normal(size=NOISE) * 1e-3  # no exact ties
        v = np.concatenate([features(item), noise])
        out.append(v / np.linalg.norm(v))
    return np.asarray(out, np.float32)


def random_encode(items) -> np.ndarray:
    out = np.stack([np.random.default_rng(_seed(it)).normal(size=32) for it in items]) if items else np.zeros((0, 32))
    return (out / np.linalg.norm(out, axis=1, keepdims=True)).astype(np.float32)


def chance(data) -> float:
    """Expected hit@1 of a random ranking: per-query candidate lists, or the global pool."""
    if data.local is not None:
        return float(np.mean([len(set(data.labels[i])) / len(set(ix)) for i, ix in enumerate(data.local)]))
    return float(np.mean([min(1.0, len(set(lab)) / len(data.cands)) for lab in data.labels]))


def chance_scores(root, tasks=IMAGE_TASKS) -> dict[str, float]:
    return {t: 100 * chance(read_task(TASKS[t], root)) for t in tasks}


def toy_eval_scores(encode, root, out_dir, tasks=IMAGE_TASKS) -> dict[str, dict[str, float]]:
    """Scores (hit@1 x 100) per task on the toy evaluation set at `root`, without T-CoTs ("plain")
    and with its bundled oracle T-CoTs ("oracle"), as in the README's evaluation table."""
    out = {}
    for name, tcot in (("plain", None), ("oracle", f"{root}/tcot")):
        res = evaluate(encode, root, f"{out_dir}/{name}", tasks=tasks, model_tag=name, tcot_dir=tcot, log=lambda m: None)
        out[name] = res["summary"]["tasks"]
    return out
