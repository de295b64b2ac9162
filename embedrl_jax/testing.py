"""Tiny random Qwen3-VL models and inputs built offline with transformers' own classes (tests, selfcheck)."""
from __future__ import annotations

import numpy as np

IMAGE_ID, VIDEO_ID, VSTART, VEND = 5, 6, 3, 4
VOCAB = 306
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
            "<|image_pad|>", "<|video_pad|>"]
TOKENIZER_TEXTS = ["a small test sentence", "the quick brown fox jumps over the lazy dog",
                   "retrieval with reasoning", "an image of an astronaut"]


def tiny_tokenizer(texts=None, vocab_size=VOCAB - 10):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts or TOKENIZER_TEXTS) * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")


def tiny_hf_config(tie=False, deepstack=(0, 1), text_layers=2, vision_depth=2, vocab=VOCAB):
    from transformers import Qwen3VLConfig

    return Qwen3VLConfig(
        text_config=dict(
            vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=text_layers,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
            rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [4, 2, 2], "mrope_interleaved": True},
            tie_word_embeddings=tie,
        ),
        vision_config=dict(
            depth=vision_depth, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=16,
            temporal_patch_size=2, spatial_merge_size=2, out_hidden_size=64, num_position_embeddings=64,
            deepstack_visual_indexes=list(deepstack),
        ),
        image_token_id=IMAGE_ID, video_token_id=VIDEO_ID, vision_start_token_id=VSTART, vision_end_token_id=VEND,
        tie_word_embeddings=tie,
    )


def tiny_hf_model(seed=0, **kw):
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(tiny_hf_config(**kw)).eval()
    # random init leaves norms at 1 and biases at 0: perturb every tensor so the test sees them
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def image_processor(min_tokens=4, max_tokens=64):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(
        patch_size=16, temporal_patch_size=2, merge_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3,
        size={"shortest_edge": min_tokens * 32 * 32, "longest_edge": max_tokens * 32 * 32},
    )


def real_image(name="astronaut", size=None):
    from PIL import Image
    import skimage.data

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
    import torch

    kw = {k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()}
    if position_ids is not None:
        kw["position_ids"] = torch.from_numpy(position_ids)
    with torch.no_grad():
        return model(**kw).logits.float().numpy()
