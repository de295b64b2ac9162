"""KV-cache decoding against transformers' generate (greedy), text and image prompts, float32."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import embedrl_jax
from embedrl_jax.models.qwen3_vl.inputs import pack_inputs
from embedrl_jax.reason.sampler import jitted_generate
from tiny import build_inputs, real_image, tiny_hf_model

N_NEW = 32


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    model = tiny_hf_model(seed=3)
    path = tmp_path_factory.mktemp("hf")
    model.save_pretrained(path)
    return model, embedrl_jax.load_hf(path)


def _ours(handle, inputs, **kw):
    arrays, info = pack_inputs(handle.model_config, **inputs, pad_to=inputs["input_ids"].shape[1])
    gen = jitted_generate(handle.model_def, N_NEW, (), kw.get("temperature", 0.0), 0, 1.0, kw.get("layer_loop"))
    toks, lps, mask = gen(handle.params, arrays, jnp.asarray(info["rope_deltas"]), jax.random.key(kw.get("seed", 0)))
    return np.asarray(toks), np.asarray(lps), np.asarray(mask)


def _hf(model, inputs):
    inputs = {k: np.asarray(v) for k, v in inputs.items()}
    kw = {k: torch.from_numpy(v) for k, v in inputs.items()}
    with torch.no_grad():
        out = model.generate(**kw, do_sample=False, max_new_tokens=N_NEW, min_new_tokens=N_NEW,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=0, eos_token_id=None)
    toks = out.sequences[:, inputs["input_ids"].shape[1]:].numpy()
    logits = torch.stack(out.logits, 1).float()
    lps = torch.log_softmax(logits, -1).gather(-1, out.sequences[:, -N_NEW:, None])[..., 0].numpy()
    return toks, lps


@pytest.mark.parametrize("layer_loop", ["scan", "unrolled"])  # accelerators' default, XLA:CPU's default
@pytest.mark.parametrize("kind", ["text", "image", "video"])
def test_greedy_matches_transformers_generate(pair, kind, layer_loop):
    model, handle = pair
    if kind == "text":
        inputs = build_inputs([[12], [7]], padding_side="left")
    elif kind == "image":
        inputs = build_inputs([[3, ("image", real_image("astronaut", (96, 64))), 4],
                               [2, ("image", real_image("coffee", (64, 128))), 1]], padding_side="left")
    else:
        frames = [real_image(n, (64, 64)) for n in ("astronaut", "coffee", "chelsea", "rocket")]
        inputs = build_inputs([[4, ("video", frames), 3]], padding_side="left")
    ref_toks, ref_lps = _hf(model, inputs)
    toks, lps, mask = _ours(handle, inputs, layer_loop=layer_loop)
    assert mask.all()
    np.testing.assert_array_equal(toks, ref_toks)
    np.testing.assert_allclose(lps, ref_lps, atol=1e-4)


def test_sampling_is_reproducible(pair):
    _, handle = pair
    inputs = build_inputs([[12], [7]], padding_side="left")
    a = _ours(handle, inputs, temperature=1.0, seed=5)
    b = _ours(handle, inputs, temperature=1.0, seed=5)
    c = _ours(handle, inputs, temperature=1.0, seed=6)
    np.testing.assert_array_equal(a[0], b[0])
    assert (a[0] != c[0]).any()


@pytest.fixture(scope="module")
def reasoner_dir(tmp_path_factory):
    from embedrl_jax.testing import image_processor, tiny_tokenizer

    path = tmp_path_factory.mktemp("reasoner")
    tiny_hf_model(seed=4).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    image_processor(min_tokens=4, max_tokens=16).save_pretrained(path)
    return path


def test_reasoner_prepare_generate_matches_transformers(reasoner_dir):
    from transformers import AutoModelForImageTextToText

    from embedrl_jax import Reasoner

    r = Reasoner.from_pretrained(reasoner_dir)
    prompts = [{"text": "describe the image", "images": [real_image("astronaut", (96, 64))]},
               {"text": "a small test sentence"}]
    batch = r.prepare(prompts)
    assert batch["attention_mask"][:, -1].all() and not batch["attention_mask"][1, 0]  # left padded
    out = r.generate(batch, n=2, max_new_tokens=N_NEW)
    assert out.tokens.shape == out.logprobs.shape == out.mask.shape == (2, 2, N_NEW)
    np.testing.assert_array_equal(out.tokens[:, 0], out.tokens[:, 1])  # greedy: samples agree
    ref = AutoModelForImageTextToText.from_pretrained(reasoner_dir).eval()
    ref_toks, ref_lps = _hf(ref, batch)
    np.testing.assert_array_equal(out.tokens[:, 0], ref_toks)
    np.testing.assert_allclose(out.logprobs[:, 0], ref_lps, atol=1e-4)
    assert len(out.texts) == 2 and all(isinstance(t, str) for row in out.texts for t in row)
    sampled = r.generate(batch, n=3, max_new_tokens=8, temperature=1.0, top_k=20, top_p=0.9, seed=1)
    again = r.generate(batch, n=3, max_new_tokens=8, temperature=1.0, top_k=20, top_p=0.9, seed=1)
    np.testing.assert_array_equal(sampled.tokens, again.tokens)
    assert np.isfinite(sampled.logprobs[sampled.mask]).all() and (sampled.logprobs[sampled.mask] <= 0).all()


def test_reasoner_rejects_a_prompt_over_the_limit(reasoner_dir):
    from embedrl_jax import Reasoner

    r = Reasoner.from_pretrained(reasoner_dir, max_prompt_tokens=8)
    with pytest.raises(ValueError, match="longer than max_prompt_tokens=8"):
        r.prepare([{"text": "the quick brown fox jumps over the lazy dog"}])
