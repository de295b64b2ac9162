"""Tiny random Qwen3-VL models as transformers' PyTorch oracle, and test inputs (tests, selfcheck).

This module needs torch (the test extra); the product's torch-free toy base is `toy.base`."""
from __future__ import annotations

import numpy as np
import skimage.data
import torch
from PIL import Image
from transformers import Qwen3VLForConditionalGeneration

from .toy.base import (IMAGE_ID, SPECIALS, TOKENIZER_TEXTS, VEND, VIDEO_ID, VOCAB, VSTART,  # noqa: F401
                        image_processor, tiny_hf_config, tiny_tokenizer)


def tiny_hf_model(seed=0, **kw):
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(tiny_hf_config(**kw)).eval()
    # random init leaves norms at 1 and biases at 0: perturb every tensor so the test sees them
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def real_image(name="astronaut", size=None):
    arr = getattr(skimage.data, name)()
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, -1)
    img = Image.fromarray(arr[..., :3])
    if size is not None:
        img = img.resize(size)
    return img


def build_inputs(samples, processor=None, *, padding_side="right", rng=None, token_ids=None, vocab=VOCAB):
    """samples: list of lists of segments: int (text length), ("image", PIL) or ("video", [PIL...]).

    Follows the offline processor recipe: one vision_start/pad/vision_end per image, the
    pad expanded to prod(grid)//4 tokens; video frames are stacked in pairs (temporal patch 2).
    """
    processor = processor or image_processor()
    rng = rng or np.random.default_rng(0)
    ids_ = token_ids or dict(image=IMAGE_ID, video=VIDEO_ID, start=VSTART, end=VEND)
    image_id, video_id, vstart, vend = ids_["image"], ids_["video"], ids_["start"], ids_["end"]
    high = min(vocab, 150_000)  # stay below real checkpoints' special-token block

    def text(n):
        out = rng.integers(10, high, size=n)
        return [int(x) for x in out if x not in (image_id, video_id, vstart, vend)] + [10] * int(
            np.isin(out, [image_id, video_id, vstart, vend]).sum())
    rows, pix, grids, vpix, vgrids = [], [], [], [], []
    for segs in samples:
        ids = []
        for seg in segs:
            if isinstance(seg, int):
                ids += text(seg)
            elif seg[0] == "image":
                out = processor(images=[seg[1]], return_tensors="np")
                g = out["image_grid_thw"][0]
                pix.append(out["pixel_values"])
                grids.append(g)
                ids += [vstart] + [image_id] * (int(np.prod(g)) // 4) + [vend]
            elif seg[0] == "video":
                frames = seg[1]
                per = [processor(images=[f], return_tensors="np") for f in frames]
                g0 = per[0]["image_grid_thw"][0]
                t = len(frames) // 2
                # temporal patch 2: consecutive frame pairs share one patch (C, Tp, P, P) layout
                ps = [p["pixel_values"].reshape(int(g0[1] * g0[2]), 3, 2, 16, 16) for p in per]
                pv = []
                for k in range(t):
                    a, b = ps[2 * k][:, :, 0], ps[2 * k + 1][:, :, 0]
                    pv.append(np.stack([a, b], 2).reshape(int(g0[1] * g0[2]), -1))
                vpix.append(np.concatenate(pv))
                vgrids.append(np.array([t, g0[1], g0[2]]))
                for k in range(t):
                    ids += text(3)  # timestamp text
                    ids += [vstart] + [video_id] * (int(g0[1] * g0[2]) // 4) + [vend]
        rows.append(ids)
    length = max(map(len, rows))
    input_ids = np.zeros((len(rows), length), np.int64)
    mask = np.zeros((len(rows), length), np.int64)
    for i, ids in enumerate(rows):
        if padding_side == "right":
            input_ids[i, : len(ids)] = ids
            mask[i, : len(ids)] = 1
        else:
            input_ids[i, length - len(ids):] = ids
            mask[i, length - len(ids):] = 1
    out = dict(input_ids=input_ids, attention_mask=mask)
    out["mm_token_type_ids"] = ((input_ids == image_id) + 2 * (input_ids == video_id)).astype(np.int64)
    if pix:
        out["pixel_values"] = np.concatenate(pix).astype(np.float32)
        out["image_grid_thw"] = np.stack(grids).astype(np.int64)
    if vpix:
        out["pixel_values_videos"] = np.concatenate(vpix).astype(np.float32)
        out["video_grid_thw"] = np.stack(vgrids).astype(np.int64)
    return out


def hf_logits(model, inputs, position_ids=None):
    kw = {k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()}
    if position_ids is not None:
        kw["position_ids"] = torch.from_numpy(position_ids)
    with torch.no_grad():
        return model(**kw).logits.float().numpy()
