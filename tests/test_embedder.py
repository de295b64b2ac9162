"""Embedder and input builder on a tiny random Qwen3-VL, against transformers' hidden states."""
import json
import shutil

import numpy as np
import pytest
import torch

from embedrl_jax.data.inputs import InputBuilder, InputConfig, ModelIds
from embedrl_jax.embed import Embedder, pool_at_token
from tiny import IMAGE_ID, VIDEO_ID, VSTART, VEND, image_processor, real_image, tiny_hf_model, tiny_tokenizer

TOL = 1e-5
CFG = InputConfig(image_min_tokens=4, image_max_tokens=16, frame_min_tokens=4, frame_max_tokens=8)
SUFFIX = "Summarize the above content in one word:"
IMG = "<|vision_start|><|image_pad|><|vision_end|>"
VID = "<|vision_start|><|video_pad|><|vision_end|>"
TAIL = f"{SUFFIX}<|im_end|>\n<|im_start|>assistant\n<emb><|im_end|>\n"
TCOT = ('<thinking>the fox is here {"bbox_2d": [100, 100, 600, 700]}</thinking>\n'
        "<rethink>checked</rethink><answer>a brown fox</answer>")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("embedder_hf")
    model = tiny_hf_model()
    model.save_pretrained(path)
    tok = tiny_tokenizer()
    tok.add_tokens(["<emb>"])
    assert tok.convert_tokens_to_ids("<emb>") < 306  # the tiny vocab has spare rows
    tok.save_pretrained(path)
    image_processor().save_pretrained(path)
    return model, path


@pytest.fixture(scope="module")
def emb(hf_dir):
    return Embedder.from_pretrained(hf_dir[1], input_config=CFG)


def _images():
    return real_image("astronaut", (128, 96)), real_image("coffee", (64, 64)), real_image("chelsea", (96, 64))


def _mixed_items():
    a, b, c = _images()
    return [
        {"text": "a small test sentence"},
        {"images": [a], "text": "an image of an astronaut"},
        {"images": [b, c], "instruction": "find", "text": "the quick brown fox"},
        {"images": [a], "text": "retrieval with reasoning", "tcot": TCOT},
    ]


def _video_item():
    frames = [np.asarray(real_image(n, (64, 64))) for n in ("astronaut", "coffee", "chelsea", "rocket")]
    return {"text": "a video of the lazy dog", "video": frames}


def _hf_embeddings(model, batch, emb_id):
    with torch.no_grad():
        hidden = model.model(**{k: torch.from_numpy(v) for k, v in batch.items()}).last_hidden_state.float().numpy()
    out = []
    for i, row in enumerate(batch["input_ids"]):
        v = hidden[i, np.where(row == emb_id)[0][-1]]
        out.append(v / np.linalg.norm(v))
    return np.stack(out)


@pytest.fixture(scope="module")
def mixed_ref(hf_dir, emb):
    batch = emb.prepare(_mixed_items())
    return batch, _hf_embeddings(hf_dir[0], batch, emb.emb_token_id)


# ---------------------------------------------------------------------------------- pooling
def test_pool_at_token_matches_numpy():
    rng = np.random.default_rng(0)
    hidden = rng.normal(size=(4, 7, 5)).astype(np.float32)
    ids = rng.integers(10, 20, size=(4, 7))
    mask = np.ones((4, 7), np.int64)
    ids[0, [2, 5]] = 9  # two occurrences: the last one counts
    ids[1, 6] = 9
    mask[2, :3] = 0  # left padded, no token: last valid position
    mask[3, 4:] = 0  # right padded, no token, and a masked-out token id is ignored
    ids[3, 5] = 9
    got = np.asarray(pool_at_token(hidden, ids, mask, 9))
    np.testing.assert_array_equal(got, hidden[[0, 1, 2, 3], [5, 6, 6, 3]])


# ---------------------------------------------------------------------------------- parity
def test_embeddings_match_transformers_mixed_batch(emb, mixed_ref):
    batch, ref = mixed_ref
    assert emb.input_config.padding_side == "left" and batch["attention_mask"][:, 0].min() == 0
    assert len(batch["image_grid_thw"]) == 5  # 1 + 2 + 1 + one evidence crop
    out = emb.embed_batch(batch)
    assert out.shape == (4, 64) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=-1), 1, atol=1e-6)
    assert np.abs(out - ref).max() <= TOL


def test_embeddings_match_transformers_video(hf_dir, emb):
    batch = emb.prepare([_video_item()])
    assert "pixel_values_videos" in batch and "pixel_values" not in batch
    np.testing.assert_array_equal(batch["video_grid_thw"], [[2, 4, 4]])
    ref = _hf_embeddings(hf_dir[0], batch, emb.emb_token_id)
    assert np.abs(emb.embed_batch(batch) - ref).max() <= TOL


# ---------------------------------------------------------------------------------- layout
def test_layout_image_text_and_text_only(emb):
    a, b, _ = _images()
    chat, media = emb.builder.render({"images": [a, b], "text": "two pictures"})
    assert chat == f"<|im_start|>user\n{IMG}{IMG}two pictures{TAIL}"
    assert [(m["type"], m["budget"]) for m in media] == [("image", "image")] * 2
    chat, media = emb.builder.render({"instruction": "Find the caption:", "text": "a fox"})
    assert chat == f"<|im_start|>user\nFind the caption: a fox{TAIL}" and media == []
    chat, _ = emb.builder.render({"text": "a <|image_pad|>fox"})  # literal markers are removed
    assert chat == f"<|im_start|>user\na fox{TAIL}"


def test_layout_tcot_parts_then_suffix_then_emb(emb):
    a, _, _ = _images()
    chat, media = emb.builder.render({"images": [a], "text": "q", "tcot": TCOT})
    thinking = '<thinking>the fox is here {"bbox_2d": [100, 100, 600, 700]}</thinking>\n'
    assert chat == (f"<|im_start|>user\n{IMG}q{thinking}{IMG}"
                    f"<rethink>checked</rethink><answer>a brown fox</answer>{TAIL}")
    assert media[0]["image"].size == (128, 96) and media[1]["image"].size == (64, 58)  # crop of the original
    # an already-built dict with a key frame (frame budget) renders the same way
    parts = {"parts": [{"type": "text", "text": "<thinking>t</thinking>\n"},
                       {"type": "image", "image": a, "budget": "frame"}, {"type": "text", "text": "rest"}]}
    chat, media = emb.builder.render({"text": "q", "tcot": parts})
    assert chat == f"<|im_start|>user\nq<thinking>t</thinking>\n{IMG}rest{TAIL}"
    assert media[0]["budget"] == "frame"


def test_layout_video_true_video_and_as_images(emb):
    item = _video_item()
    chat, media = emb.builder.render(item)
    assert chat == f"<|im_start|>user\na video of the lazy dog{VID}{TAIL}"
    assert media[0]["type"] == "video" and media[0]["timestamps"] == [0.25, 1.25]
    batch = emb.prepare([item])
    text = emb.tokenizer.decode(batch["input_ids"][0])
    group = "<|vision_start|>" + "<|video_pad|>" * 4 + "<|vision_end|>"
    assert f"a video of the lazy dog<0.2 seconds>{group}<1.2 seconds>{group}{SUFFIX}" in text
    assert (batch["mm_token_type_ids"] == 2).sum() == 8 and (batch["input_ids"] == VIDEO_ID).sum() == 8

    frames_cfg = InputConfig(**{**CFG.__dict__, "video_as_images": True})
    builder = InputBuilder(emb.tokenizer, emb.image_processor, emb.handle.config, frames_cfg)
    chat, media = builder.render(item)
    assert chat == f"<|im_start|>user\na video of the lazy dog{IMG * 4}{TAIL}"
    assert [m["budget"] for m in media] == ["frame"] * 4
    # key frames of a T-CoT string are 1-based into the sampled frames, at the frame budget
    cot = '<thinking>see {"key_frames": [2]}</thinking>\n<answer>a dog</answer>'
    chat, media = emb.builder.render({**item, "tcot": cot})
    assert chat.endswith(f"{VID}<thinking>see {{\"key_frames\": [2]}}</thinking>\n{IMG}<answer>a dog</answer>{TAIL}")
    assert media[1]["budget"] == "frame" and np.array_equal(np.asarray(media[1]["image"]), item["video"][1])
    # generate mode (Reasoner): media first, then text, no suffix and no <emb>
    chat, _ = builder.render(item, mode="generate")
    assert chat == f"<|im_start|>user\n{IMG * 4}a video of the lazy dog<|im_end|>\n<|im_start|>assistant\n"


def test_video_frame_sampling_odd_counts_and_timestamps(emb):
    cfg = InputConfig(**{**CFG.__dict__, "num_frames": 4})
    builder = InputBuilder(emb.tokenizer, emb.image_processor, ModelIds.from_config(emb.handle.config), cfg)
    frames = [np.full((64, 64, 3), 20 * i, np.uint8) for i in range(10)]
    _, media = builder.render({"text": "v", "video": frames})
    assert media[0]["frame_index"] == [0, 3, 6, 9] and media[0]["timestamps"] == [0.75, 3.75]
    _, media = builder.render({"text": "v", "video": frames[:3]})
    assert media[0]["frame_index"] == [0, 1, 2, 2]  # odd: the last frame repeats
    batch = builder.build([{"text": "v", "video": frames[:3]}])
    np.testing.assert_array_equal(batch["video_grid_thw"], [[2, 4, 4]])
    pv = batch["pixel_values_videos"].reshape(2, 16, 3, 2, 16, 16)
    np.testing.assert_array_equal(pv[1, :, :, 0], pv[1, :, :, 1])  # group 2 = frame 3 twice
    assert not np.array_equal(pv[0, :, :, 0], pv[0, :, :, 1])


def test_placeholder_counts_and_types_in_batch(emb, mixed_ref):
    batch, _ = mixed_ref
    grids = batch["image_grid_thw"]
    assert batch["pixel_values"].shape == (int(grids.prod(-1).sum()), 1536)
    tokens = grids.prod(-1) // 4
    per_row = (batch["input_ids"] == IMAGE_ID).sum(-1)
    np.testing.assert_array_equal(per_row, [0, tokens[0], tokens[1] + tokens[2], tokens[3] + tokens[4]])
    np.testing.assert_array_equal(batch["mm_token_type_ids"], (batch["input_ids"] == IMAGE_ID) * batch["attention_mask"])
    assert (grids[:, 1:].prod(-1) // 4 <= 16).all() and (grids[:, 1:].prod(-1) // 4 >= 4).all()  # the budget
    im_end = emb.tokenizer.convert_tokens_to_ids("<|im_end|>")
    for row, mask, n_images in zip(batch["input_ids"], batch["attention_mask"], [0, 1, 2, 2]):
        valid = row[mask.astype(bool)]
        assert (row[~mask.astype(bool)] == emb.tokenizer.pad_token_id).all()
        assert valid[-3] == emb.emb_token_id and valid[-2] == im_end
        assert (valid == VSTART).sum() == (valid == VEND).sum() == n_images


def test_large_image_is_resized_into_the_budget(emb):
    batch = emb.prepare([{"images": [real_image("astronaut")]}])  # 512x512, far over 16 tokens
    assert batch["image_grid_thw"].tolist() == [[1, 8, 8]] and (batch["input_ids"] == IMAGE_ID).sum() == 16


def test_right_padding_and_text_truncation(emb):
    cfg = InputConfig(**{**CFG.__dict__, "padding_side": "right", "max_text_tokens": 5})
    builder = InputBuilder(emb.tokenizer, emb.image_processor, emb.handle.config, cfg)
    long = "the quick brown fox jumps over the lazy dog " * 3
    kept = builder.truncate(long)
    assert long.startswith(kept) and len(emb.tokenizer(kept, add_special_tokens=False)["input_ids"]) == 5
    chat, _ = builder.render({"text": long})
    assert chat == f"<|im_start|>user\n{kept}{TAIL}"  # the template and suffix are never cut
    batch = builder.build([{"text": "a"}, {"text": long}], pad_to_multiple=8)
    assert batch["input_ids"].shape[1] % 8 == 0 and batch["attention_mask"][:, 0].all()


# ---------------------------------------------------------------------------------- encode
def test_encode_restores_order_across_groups_and_batches(emb, mixed_ref):
    _, ref = mixed_ref
    items = _mixed_items()
    perm = [3, 0, 2, 1, 0]
    out = emb.encode([items[i] for i in perm], batch_size=16)
    assert np.abs(out - ref[perm]).max() <= TOL
    small = emb.encode([items[i] for i in perm], batch_size=1, progress=False)
    assert np.abs(small - out).max() <= TOL

    trunc = emb.encode([items[i] for i in perm], batch_size=16, dim=16)
    want = ref[perm][:, :16] / np.linalg.norm(ref[perm][:, :16], axis=-1, keepdims=True)
    assert trunc.shape == (5, 16) and np.abs(trunc - want).max() <= TOL
    assert emb.encode([]).shape == (0, 64) and emb.encode([], dim=8).shape == (0, 8)


def test_orbax_checkpoint_gives_the_same_embeddings(emb, mixed_ref, tmp_path):
    from embedrl_jax.checkpoint import save_handle

    _, ref = mixed_ref
    save_handle(tmp_path / "orbax", emb.handle)
    assert (tmp_path / "orbax" / "params").is_dir()
    other = Embedder.from_pretrained(tmp_path / "orbax", input_config=CFG)
    assert other.emb_token_id == emb.emb_token_id
    batch = other.prepare(_mixed_items())
    assert np.abs(other.embed_batch(batch) - ref).max() <= TOL


# ---------------------------------------------------------------------------------- loading
def test_emb_token_from_config_tokenizer_and_vocab_checks(hf_dir, emb, tmp_path):
    _, src = hf_dir
    d = tmp_path / "m"
    shutil.copytree(src, d)
    cfg = json.loads((d / "config.json").read_text())

    cfg["emb_token_ids"] = [emb.emb_token_id]
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "preprocessor_config.json").unlink()
    e = Embedder.from_pretrained(d, input_config=CFG)
    assert e.emb_token_ids == [emb.emb_token_id]
    proc = e.image_processor  # built from the config: patch 16, merge 2, mean = std = 0.5
    assert (proc.patch_size, proc.merge_size, list(proc.image_mean)) == (16, 2, [0.5] * 3)

    cfg["emb_token_ids"] = [emb.emb_token_id - 1]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="emb_token_ids"):
        Embedder.from_pretrained(d, input_config=CFG)

    del cfg["emb_token_ids"]
    (d / "config.json").write_text(json.dumps(cfg))
    tok = tiny_tokenizer()  # no <emb>: the Embedder adds it as an ordinary token
    tok.save_pretrained(d)
    e = Embedder.from_pretrained(d, input_config=CFG)
    assert e.emb_token_id == emb.emb_token_id and "<emb>" not in e.tokenizer.all_special_tokens

    tok.add_tokens([f"filler{i}" for i in range(12)])  # pushes <emb> past the 306-row vocab
    tok.save_pretrained(d)
    with pytest.raises(ValueError, match="outside the model's vocab"):
        Embedder.from_pretrained(d, input_config=CFG)


# ---------------------------------------------------------------------------------- bad input
def test_bad_inputs_name_the_item_and_field(emb, tmp_path):
    good = {"images": [real_image("coffee", (64, 64))], "text": "ok"}
    missing = {"images": [tmp_path / "nope.png"], "text": "x"}
    corrupt_path = tmp_path / "corrupt.png"
    corrupt_path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    corrupt = {"text": "x", "images": [real_image("coffee", (64, 64)), str(corrupt_path)]}

    with pytest.raises(ValueError, match=r"item 1: field 'images\[0\]'.*does not exist"):
        emb.prepare([good, missing])
    with pytest.raises(ValueError, match=r"item 0: field 'images\[1\]'.*cannot read image file"):
        emb.prepare([corrupt])
    with pytest.raises(ValueError, match=r"item 2: empty item"):
        emb.prepare([good, good, {"text": ""}])
    with pytest.raises(ValueError, match=r"item 0: field 'images\[0\]'.*aspect ratio"):
        emb.prepare([{"images": [np.zeros((2, 500, 3), np.uint8)]}])
    with pytest.raises(ValueError, match=r"item 0: field 'video\[1\]'.*uint8"):
        emb.prepare([{"video": [np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8, 3), np.float32)]}])
    with pytest.raises(ValueError, match=r"item 0: field 'tcot.parts\[0\]'"):
        emb.prepare([{"text": "x", "tcot": {"parts": [{"type": "audio"}]}}])
    with pytest.raises(ValueError, match=r"item 0: field 'image_path'"):
        emb.prepare([{"text": "x", "image_path": "a.png"}])
    # encode reports the index in the caller's list, not within its modality group
    with pytest.raises(ValueError, match=r"item 2: field 'images\[0\]'"):
        emb.encode([good, {"text": "t"}, missing], batch_size=4)
