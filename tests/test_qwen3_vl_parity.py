"""Qwen3-VL in JAX against transformers' PyTorch model, on tiny random models (float32)."""
import numpy as np
import pytest
import torch

import embedrl_jax
from embedrl_jax.models.qwen3_vl.inputs import pack_inputs
from embedrl_jax.models.qwen3_vl.rope import get_rope_index
from tiny import build_inputs, hf_logits, real_image, tiny_hf_model

pytestmark = pytest.mark.parity

TOL = 1e-4


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def pair(request, tmp_path_factory):
    model = tiny_hf_model(tie=request.param)
    path = tmp_path_factory.mktemp("hf")
    model.save_pretrained(path)
    return model, embedrl_jax.load_hf(path), path


def _max_err(model, handle, inputs, **kw):
    ref = hf_logits(model, inputs, **kw)
    out = handle.logits(**inputs)
    assert out.shape == ref.shape
    valid = np.asarray(inputs["attention_mask"]).astype(bool)
    return float(np.abs(out - ref)[valid].max())


def test_text_only(pair):
    model, handle, _ = pair
    assert _max_err(model, handle, build_inputs([[23]])) <= TOL


def test_text_only_left_padded_batch(pair):
    # transformers' plain forward uses arange positions for text-only input; its own
    # get_rope_index gives the mask-aware positions we always use, so compare with those.
    model, handle, _ = pair
    inputs = build_inputs([[23], [11]], padding_side="left")
    pos, _ = model.model.get_rope_index(
        torch.from_numpy(inputs["input_ids"]), torch.from_numpy(inputs["mm_token_type_ids"]),
        attention_mask=torch.from_numpy(inputs["attention_mask"]),
    )
    assert _max_err(model, handle, inputs, position_ids=pos.numpy()) <= TOL


def test_one_image(pair):
    model, handle, _ = pair
    inputs = build_inputs([[7, ("image", real_image("astronaut", (96, 64))), 5]])
    assert _max_err(model, handle, inputs) <= TOL


@pytest.mark.parametrize("side", ["right", "left"])
def test_batch_of_two_with_different_images_and_padding(pair, side):
    model, handle, _ = pair
    inputs = build_inputs(
        [
            [4, ("image", real_image("astronaut", (96, 64))), 3, ("image", real_image("coffee", (64, 128))), 5],
            [6, ("image", real_image("chelsea", (160, 96))), 2],
        ],
        padding_side=side,
    )
    assert inputs["attention_mask"].min() == 0  # really padded
    assert _max_err(model, handle, inputs) <= TOL


def test_video_and_image(pair):
    model, handle, _ = pair
    frames = [real_image(n, (64, 64)) for n in ("astronaut", "coffee", "chelsea", "rocket")]
    assert _max_err(model, handle, build_inputs([[5, ("video", frames), 4]])) <= TOL
    mixed = build_inputs([[5, ("video", frames), 2, ("image", real_image("astronaut", (96, 64))), 3]])
    assert _max_err(model, handle, mixed) <= TOL


def test_vision_tower_alone(pair):
    model, handle, _ = pair
    inputs = build_inputs([[2, ("image", real_image("astronaut", (96, 64))), 1, ("image", real_image("coffee", (64, 128)))]])
    with torch.no_grad():
        ref = model.model.visual(torch.from_numpy(inputs["pixel_values"]), grid_thw=torch.from_numpy(inputs["image_grid_thw"]))
    arrays, info = pack_inputs(handle.model_config, **inputs)
    import jax

    merged, deep = jax.jit(handle.model_def.vision)(handle.params, {k: arrays[k] for k in ("patches", "segment_ids", "pos_idx", "pos_w", "rowcol")})
    rows = info["visual_rows"]
    np.testing.assert_allclose(np.asarray(merged)[rows], ref.pooler_output.numpy(), atol=1e-5, rtol=0)
    assert len(ref.deepstack_features) == deep.shape[0] == 2
    for k, feat in enumerate(ref.deepstack_features):
        np.testing.assert_allclose(np.asarray(deep[k])[rows], feat.numpy(), atol=1e-5, rtol=0)


def test_rope_index_matches_transformers(pair):
    model, _, _ = pair
    frames = [real_image(n, (64, 96)) for n in ("astronaut", "coffee")]
    inputs = build_inputs(
        [
            [3, ("image", real_image("astronaut", (96, 64))), 2, ("video", frames), 4],
            [1, ("image", real_image("chelsea", (64, 160))), 1, ("image", real_image("coffee", (64, 64)))],
        ],
        padding_side="left",
    )
    t = {k: torch.from_numpy(v) for k, v in inputs.items() if not k.startswith("pixel")}
    ref_pos, ref_delta = model.model.get_rope_index(
        t["input_ids"], t["mm_token_type_ids"], t["image_grid_thw"], t["video_grid_thw"], t["attention_mask"]
    )
    pos, delta = get_rope_index(
        inputs["input_ids"], inputs["mm_token_type_ids"], inputs["image_grid_thw"], inputs["video_grid_thw"],
        inputs["attention_mask"], 2,
    )
    np.testing.assert_array_equal(pos, ref_pos.numpy())
    np.testing.assert_array_equal(delta, ref_delta.numpy().ravel())


def test_new_image_size_in_same_bucket_does_not_recompile(pair):
    _, handle, _ = pair
    # 24 vs 16 patches and 20 tokens each: the same patch-row and sequence buckets
    a = build_inputs([[7, ("image", real_image("astronaut", (96, 64))), 5]])
    b = build_inputs([[9, ("image", real_image("coffee", (64, 64))), 5]])
    assert a["pixel_values"].shape != b["pixel_values"].shape
    handle.logits(**a)
    before = handle._logits._cache_size()
    handle.logits(**b)
    assert handle._logits._cache_size() == before


def test_bfloat16_forward_close_to_float32(pair):
    model, handle, path = pair
    inputs = build_inputs([[7, ("image", real_image("astronaut", (96, 64))), 5]])
    bf16 = embedrl_jax.load_hf(path, dtype="bfloat16")
    out16 = bf16.logits(**inputs)
    out32 = handle.logits(**inputs)
    assert np.isfinite(out16).all()
    # stated tolerance: 5% of the fp32 logit range (bf16 has 8 mantissa bits; 2 layers)
    scale = np.abs(out32).max()
    assert np.abs(out16 - out32).max() <= 0.05 * scale
    assert (out16.argmax(-1) == out32.argmax(-1)).mean() >= 0.9


def test_bucket_rule():
    from embedrl_jax.models.qwen3_vl.inputs import Buckets, bucket

    assert [bucket(n) for n in (5, 16, 17, 326, 784, 3000, 8193)] == [16, 16, 24, 336, 800, 3072, 8704]
    b = Buckets()
    assert [b.rows(n) for n in (1, 3, 4, 17, 40)] == [1, 3, 4, 17, 40]
    assert b.rows(70) == 72 and b.patches(10) == 64
    for n in range(1, 5000, 7):
        assert n <= bucket(n) <= max(16, n * 1.0625 + 8)
