"""Reasoner robustness: sharded generation equals one device, bad input, stop strings, bad bytes."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from tiny import image_processor, real_image, tiny_hf_model, tiny_tokenizer

from embedrl_jax import tcot
from embedrl_jax.reason.reasoner import _decode, _tokens_for
from embedrl_jax.reason.sampler import jitted_generate
from embedrl_jax.sharding import MeshConfig, make_mesh

N_NEW = 32
PROMPTS = [
    {"text": "describe the image", "images": [real_image("astronaut", (96, 64))]},
    {"text": "a small test sentence"},
    {"text": "where is the cup?", "images": [real_image("coffee", (64, 96))]},
    {"text": "the quick brown fox jumps over the lazy dog"},
]


@pytest.fixture(scope="module")
def reasoner_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("reasoner_robust")
    tiny_hf_model(seed=4).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    image_processor(min_tokens=4, max_tokens=16).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def single(reasoner_dir):
    from embedrl_jax import Reasoner

    return Reasoner.from_pretrained(reasoner_dir)  # one device


@pytest.fixture(scope="module")
def batch(single):
    return single.prepare(PROMPTS)


@pytest.fixture(scope="module")
def reference(single, batch):
    return single.generate(batch, n=2, max_new_tokens=N_NEW)


# ------------------------------------------------------------------------------- sharded generation
@pytest.mark.slow
@pytest.mark.parametrize("shape", [(1, 8, 1), (2, 2, 2)], ids=["fsdp8", "data2-fsdp2-tensor2"])
def test_sharded_generate_equals_one_device(reasoner_dir, single, batch, reference, shape):
    from embedrl_jax import Reasoner

    mesh = make_mesh(MeshConfig(*shape))
    r = Reasoner.from_pretrained(reasoner_dir, mesh=mesh)
    assert r.handle.params["layers"]["q"].sharding.mesh.size == 8
    assert not r.handle.params["layers"]["q"].sharding.is_fully_replicated
    out = r.generate(r.prepare(PROMPTS), n=2, max_new_tokens=N_NEW)
    np.testing.assert_array_equal(out.tokens, reference.tokens)
    np.testing.assert_array_equal(out.mask, reference.mask)
    np.testing.assert_allclose(out.logprobs, reference.logprobs, atol=1e-5)
    assert out.texts == reference.texts

    # no device holds the whole KV cache: 8 rows split over data x fsdp, KV heads over tensor
    arrays, deltas = r.pack(batch, 2)
    t_cfg = r.handle.model_config.text
    rows, total = arrays["input_ids"].shape[0], arrays["input_ids"].shape[1] + N_NEW
    data, fsdp, tensor = shape
    for loop, lead in (("scan", f"{t_cfg.num_hidden_layers},"), ("unrolled", "")):  # stacked / per-layer caches
        gen = jitted_generate(r.handle.model_def, N_NEW, r.eos_ids, 0.0, 0, 1.0, loop)
        with jax.set_mesh(mesh):
            hlo = gen.lower(r.handle.params, arrays, jnp.asarray(deltas), jax.random.key(0)).compile().as_text()
        full = f"f32[{lead}{rows},{t_cfg.num_key_value_heads},{total},{t_cfg.head_dim}]"
        shard = f"f32[{lead}{rows // (data * fsdp)},{t_cfg.num_key_value_heads // tensor},{total},{t_cfg.head_dim}]"
        assert full not in hlo and shard in hlo, loop


# ------------------------------------------------------------------------------- the caller's mistakes
def test_prompt_over_the_limit_is_a_clear_error(reasoner_dir, batch):
    from embedrl_jax import Reasoner

    r = Reasoner.from_pretrained(reasoner_dir, max_prompt_tokens=8)
    with pytest.raises(ValueError, match="longer than max_prompt_tokens=8"):
        r.prepare([{"text": "the quick brown fox jumps over the lazy dog"}])
    with pytest.raises(ValueError, match="longer than max_prompt_tokens=8"):  # a batch built elsewhere
        r.generate(batch, max_new_tokens=4)


def test_bad_images_name_the_item(single):
    for bad in (np.zeros((0, 0, 3), np.uint8), np.zeros((0, 7, 3), np.uint8)):
        with pytest.raises(ValueError, match=r"item 1: field 'images\[0\]': image has no pixels"):
            single.prepare([{"text": "fine"}, {"text": "bad", "images": [bad]}])
    with pytest.raises(ValueError, match=r"item 0: field 'images\[1\]': .*aspect ratio"):
        single.prepare([{"text": "x", "images": [real_image("coffee", (64, 64)), Image.new("RGB", (1, 300))]}])
    with pytest.raises(ValueError, match="item 1: empty item"):
        single.prepare([{"text": "fine"}, {"text": ""}])
    with pytest.raises(TypeError, match="list of items"):
        single.prepare({"text": "one prompt, not in a list"})
    with pytest.raises(ValueError, match="at least one item"):
        single.prepare([])


def test_images_smaller_than_a_patch_still_give_tokens(single):
    b = single.prepare([{"text": "tiny", "images": [Image.new("RGB", (1, 1), (255, 0, 0)), Image.new("RGB", (3, 2))]}])
    grids = b["image_grid_thw"]
    assert len(grids) == 2 and (grids[:, 1:] >= 2).all()
    assert (b["input_ids"] == single.builder.ids.image_token_id).sum() == grids.prod(-1).sum() // 4


def test_bad_sampling_settings_are_clear_errors(single, batch):
    for kw, word in (({"max_new_tokens": 0}, "max_new_tokens"), ({"max_new_tokens": -3}, "max_new_tokens"),
                     ({"temperature": -1.0}, "temperature"), ({"temperature": float("nan")}, "temperature"),
                     ({"top_k": -1}, "top_k"), ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p")):
        with pytest.raises(ValueError, match=word):
            single.generate(batch, **kw)


def test_zero_samples_is_a_clear_error(single):
    b = single.prepare([{"text": "a"}])
    with pytest.raises(ValueError, match=r"\bn\b"):
        single.generate(b, n=0, max_new_tokens=1)


# ------------------------------------------------------------------------------- stop strings
def test_stop_string_cuts_the_text_and_the_mask(single, batch, reference):
    text = reference.texts[0][0]
    stop = next(text[i:i + 3] for i in range(2, len(text) - 3) if "\ufffd" not in text[i:i + 3])
    out = single.generate(batch, n=2, max_new_tokens=N_NEW, stop=[stop])
    np.testing.assert_array_equal(out.tokens, reference.tokens)  # stop strings only cut text and mask
    np.testing.assert_array_equal(out.logprobs, reference.logprobs)
    cut_rows = 0
    for b in range(len(PROMPTS)):
        for s in range(2):
            full, mask, toks = reference.texts[b][s], out.mask[b, s], out.tokens[b, s]
            assert not (mask & ~reference.mask[b, s]).any()
            at = full.find(stop)
            if at < 0:
                assert out.texts[b][s] == full and (mask == reference.mask[b, s]).all()
                continue
            cut_rows += 1
            assert out.texts[b][s] == full[: at + len(stop)]
            kept = toks[mask]
            assert mask.sum() < reference.mask[b, s].sum() and mask[: mask.sum()].all()  # a shorter prefix
            assert _decode(single.tokenizer, kept).startswith(out.texts[b][s])
            assert stop not in _decode(single.tokenizer, kept[:-1])  # the shortest such prefix
    assert cut_rows >= 2  # greedy: both samples of prompt 0


# ------------------------------------------------------------------------------- the model's mistakes
def _byte_token(tokenizer, byte):
    """Id of the byte-level BPE token for one raw byte (GPT-2's bytes-to-unicode table)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in printable]
    char = chr(byte) if byte in printable else chr(256 + shifted.index(byte))
    return tokenizer.convert_tokens_to_ids(char)


BAD_BYTES = b"ok\xff\xc3(\xe2\x82\xac!"  # 0xff never valid, 0xc3 without its continuation, then a split euro sign


@pytest.fixture(scope="module")
def forced(single):
    """Weights under which the greedy completion of every text prompt is BAD_BYTES byte by byte, then EOS.

    Attention and MLP outputs are zero, so the last hidden state is the current token's
    embedding; each chain token embeds as a unit vector and the LM head maps it to the next.
    """
    tok = single.tokenizer
    chain = [_byte_token(tok, b) for b in BAD_BYTES] + [tok.convert_tokens_to_ids("<|im_end|>")]
    text_batch = single.prepare([{"text": "a small test sentence"}, {"text": "retrieval with reasoning"}])
    start = int(text_batch["input_ids"][0, -1])
    assert (text_batch["input_ids"][:, -1] == start).all()
    assert len(set(chain)) == len(chain) and start not in chain and chain[-1] in single.eos_ids
    params = jax.tree.map(np.array, single.handle.params)
    params["layers"]["o"][:] = 0
    params["layers"]["down"][:] = 0
    params["norm"][:] = 1
    params["lm_head"][:] = 0
    for j, (cur, nxt) in enumerate(zip([start] + chain[:-1], chain)):
        params["embed"][cur] = 0
        params["embed"][cur, j] = 1
        params["lm_head"][j, nxt] = 4.0
    return params, text_batch, chain


def test_non_utf8_completions_decode_to_replacement_chars(single, forced):
    params, text_batch, chain = forced
    out = single.generate(text_batch, n=2, max_new_tokens=16, params=params)
    want = BAD_BYTES.decode("utf-8", errors="replace")
    assert want == "ok\ufffd\ufffd(\u20ac!"
    assert out.texts == [[want] * 2] * 2
    assert (out.tokens[..., : len(chain)] == chain).all() and (out.tokens[..., len(chain):] == 0).all()
    assert (out.mask.sum(-1) == len(chain)).all()  # EOS included, nothing after it
    for text in (want, want + "<thinking>" + want + '{"bbox_2d": [1, 2, 3]}'):
        t = tcot.parse(text)
        assert not t.well_formed
        assert tcot.evidence_item({"text": "q", "images": [real_image("astronaut", (64, 64))]}, text)["tcot"]

    # a stop string ending inside a split multi-byte character keeps all of its byte tokens
    cut = single.generate(text_batch, n=2, max_new_tokens=16, params=params, stop=["\u20ac"])
    assert cut.texts == [["ok\ufffd\ufffd(\u20ac"] * 2] * 2
    assert (cut.mask.sum(-1) == 8).all()  # ... e2 82 ac, not just e2
    cut = single.generate(text_batch, n=2, max_new_tokens=16, params=params, stop=["!", "("])
    assert cut.texts == [["ok\ufffd\ufffd("] * 2] * 2 and (cut.mask.sum(-1) == 5).all()


def test_decode_helpers_never_raise(single):
    tok = single.tokenizer
    ids = [_byte_token(tok, b) for b in BAD_BYTES]
    assert _decode(tok, np.asarray(ids, np.int32)) == "ok\ufffd\ufffd(\u20ac!"
    assert _decode(tok, np.asarray([], np.int32)) == ""
    assert _decode(tok, np.asarray([300, 305, -1, 2**40], np.int64)) == ""  # ids past the tokenizer: skipped
    assert [_tokens_for(tok, ids, n) for n in range(8)] == [0, 1, 2, 3, 4, 5, 8, 9]


def test_bad_evidence_falls_back_gracefully_through_the_input_builder(reasoner_dir):
    """Boxes inverted / out of range / degenerate and key frames out of range: the Embedder's input
    builder still renders the item, with the evidence that survives and nothing else."""
    from transformers import AutoTokenizer

    from embedrl_jax.data.inputs import InputBuilder, InputConfig

    tok = AutoTokenizer.from_pretrained(str(reasoner_dir))
    tok.add_tokens(["<emb>"])
    builder = InputBuilder(tok, image_processor(), tiny_hf_model(seed=4).config,
                           InputConfig(image_min_tokens=4, image_max_tokens=16, frame_min_tokens=4, frame_max_tokens=8))
    image = np.asarray(real_image("astronaut", (200, 100)))
    frames = [np.asarray(real_image(n, (64, 64))) for n in ("astronaut", "coffee", "chelsea", "rocket")] * 3
    boxes = ('[[900, 800, 100, 200], [-50, -50, 2000, 5000], [500, 500, 500, 500], [0, 0, 3, 3], '
             '[1, 2, "x", 4], [0, 0, 1000, 100], [1, 2, 3]]')
    completion = (f'<thinking>look {{"bbox_2d": {boxes}, "key_frames": [0, 3, 9, 100, -3]}}</thinking>'
                  '<rethink>r</rethink><answer>a</answer>') + "\ufffd\x00"
    t = tcot.parse(completion)
    assert t.json_ok and len(t.boxes) == 5 and t.key_frames == [2, 8, 99]
    items = [tcot.evidence_item({"text": "q", "images": [image]}, completion),
             tcot.evidence_item({"text": "q", "video": frames[:8]}, completion),
             {"text": "q", "video": frames, "tcot": completion},  # unparsed: evidence from the sampled frames
             {"text": "q", "images": [image], "tcot": b'\xff<thinking>{"bbox_2d": [[0, 0, 1e999, 5]]}</thinking>tail'}]
    # crops: the inverted box (reordered), the one clamped to the whole image, the 200 x 10 px strip
    assert [p["image"].size for p in items[0]["tcot"]["parts"] if p["type"] == "image"] == [(160, 60), (200, 100), (200, 10)]
    assert sum(p["type"] == "image" for p in items[1]["tcot"]["parts"]) == 1  # key frame 3 only
    batch = builder.build(items, mode="embed")
    assert batch["input_ids"].shape[0] == 4
    img_per_row = [(row == builder.ids.image_token_id).any() for row in batch["input_ids"]]
    assert img_per_row == [True, True, True, True]
    texts = [tok.decode(row) for row in batch["input_ids"]]
    assert all(re.search(r"<answer>a</answer>", x) for x in texts[:3])


def test_empty_stop_string_is_a_clear_error(single):
    b = single.prepare([{"text": "a"}])
    with pytest.raises(ValueError, match="stop strings"):
        single.generate(b, max_new_tokens=1, stop=[""])
