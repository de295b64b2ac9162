"""Test-side name for the offline tiny-model builders (they live in the package for `embedrl selfcheck`)."""
from embedrl_jax.testing import *  # noqa: F401,F403
from embedrl_jax.testing import IMAGE_ID, VIDEO_ID, VSTART, VEND, VOCAB  # noqa: F401


def save_tiny_embedder_dir(path, seed: int = 1):
    """A tiny random Qwen3-VL HF directory an Embedder loads: weights, config, tokenizer with
    <emb>, image processor (4-16 merged tokens per image)."""
    tiny_hf_model(seed=seed).save_pretrained(path)  # noqa: F405
    tok = tiny_tokenizer()  # noqa: F405
    tok.add_tokens(["<emb>"])
    tok.save_pretrained(path)
    image_processor(min_tokens=4, max_tokens=16).save_pretrained(path)  # noqa: F405
    return path
