"""Prompt + completion layout: the training forward scores exactly what the KV-cache sampler sampled."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import embedrl_jax
from embedrl_jax.models.qwen3_vl.inputs import Buckets
from embedrl_jax.reason.sampler import jitted_generate
from embedrl_jax.reason.sequences import completion_logprobs, pack_prompts, repeat_samples, with_completions
from tiny import build_inputs, real_image, tiny_hf_model

N_NEW = 12


@pytest.fixture(scope="module")
def handle(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf")
    tiny_hf_model(seed=8).save_pretrained(path)
    return embedrl_jax.load_hf(path)


def _prompts(kind):
    if kind == "text":
        return build_inputs([[12], [5]], padding_side="left")
    if kind == "image":
        return build_inputs([[3, ("image", real_image("astronaut", (96, 64))), 4],
                             [2, ("image", real_image("coffee", (64, 128))), 1]], padding_side="left")
    frames = [real_image(n, (64, 64)) for n in ("astronaut", "coffee", "chelsea", "rocket")]
    return build_inputs([[4, ("video", frames), 3], [6]], padding_side="left")


@pytest.mark.parametrize("kind", ["text", "image", "video"])
def test_training_logprobs_equal_sampled_logprobs(handle, kind):
    inputs = {k: np.asarray(v) for k, v in _prompts(kind).items()}
    buckets = Buckets(seq_min=16)
    (arrays,), (deltas,) = pack_prompts(handle.model_config, [inputs], buckets)
    assert arrays["input_ids"].shape[1] == buckets.seq(inputs["input_ids"].shape[1])
    arrays, deltas = repeat_samples(arrays, deltas, 2)
    gen = jitted_generate(handle.model_def, N_NEW, (7,), 1.0, 0, 1.0)  # sampled, stops on token 7
    toks, lps, mask = (np.asarray(x) for x in gen(handle.params, arrays, jnp.asarray(deltas), jax.random.key(1)))
    seq = with_completions(arrays, deltas, toks, mask)
    logp, ent = jax.jit(completion_logprobs, static_argnums=(0, 3))(handle.model_def, handle.params, seq, N_NEW)
    logp, ent = np.asarray(logp), np.asarray(ent)
    np.testing.assert_allclose(np.where(mask, logp, 0), np.where(mask, lps, 0), atol=1e-4)
    assert np.isfinite(ent).all() and (ent[mask] > 0).all()


def test_stacked_prompt_batches_share_one_shape(handle):
    a = build_inputs([[12], [5]], padding_side="left")
    b = build_inputs([[3, ("image", real_image("astronaut", (96, 64))), 4]], padding_side="left")
    packed, deltas = pack_prompts(handle.model_config, [a, b], Buckets(seq_min=16))
    assert {k: v.shape[1:] for k, v in packed[0].items() if k != "positions"} == \
        {k: v.shape[1:] for k, v in packed[1].items() if k != "positions"}
    # flush left padding: every prompt's last token sits in the last column
    for p in packed:
        assert (p["attention_mask"][:, -1] == 1).all()
    assert deltas[1][0] < 0  # the image compresses positions


def test_with_completions_rejects_mismatched_rows(handle):
    (arrays,), (deltas,) = pack_prompts(handle.model_config, [build_inputs([[12], [5]], padding_side="left")])
    with pytest.raises(ValueError, match="prompt rows"):
        with_completions(arrays, deltas, np.zeros((3, 4), np.int32), np.ones((3, 4), bool))
