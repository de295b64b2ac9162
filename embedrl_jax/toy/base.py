"""A toy Qwen3-VL base built offline with JAX and transformers' torch-free config, tokenizer and
image-processor classes: what the main job and the toy runs train on when `model="tiny"`.

Weights follow transformers' initialisation in distribution (normal(0, 0.02) for matrices,
ones for norm scales, zeros for biases), with every vector perturbed by 0.1 * normal so that no
norm or bias is a no-op (the test oracle's tiny models are perturbed the same way).
"""
from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import jax
import jax.numpy as jnp
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen3VLConfig as HFQwen3VLConfig
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from .. import safetensors_io as st
from ..fsutil import replace_dir
from ..hf import hf_tensors
from ..models.qwen3_vl.config import Qwen3VLConfig
from ..models.qwen3_vl.model import init_params, model_def

__all__ = ["IMAGE_ID", "VIDEO_ID", "VSTART", "VEND", "VOCAB", "SPECIALS", "tiny_tokenizer", "tiny_hf_config",
           "image_processor", "tiny_params", "build_tiny_base", "toy_corpus"]

IMAGE_ID, VIDEO_ID, VSTART, VEND = 5, 6, 3, 4
VOCAB = 306
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
            "<|image_pad|>", "<|video_pad|>"]
TOKENIZER_TEXTS = ["a small test sentence", "the quick brown fox jumps over the lazy dog",
                   "retrieval with reasoning", "an image of an astronaut"]


def tiny_tokenizer(texts=None, vocab_size=VOCAB - 10):
    """A byte-level BPE trained on `texts` (short prompts for toy corpora), Qwen's special tokens first."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts or TOKENIZER_TEXTS) * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")


def tiny_hf_config(tie=False, deepstack=(0, 1), text_layers=2, vision_depth=2, vocab=VOCAB):
    return HFQwen3VLConfig(
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


def image_processor(min_tokens=4, max_tokens=64):
    return Qwen2VLImageProcessorPil(
        patch_size=16, temporal_patch_size=2, merge_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3,
        size={"shortest_edge": min_tokens * 32 * 32, "longest_edge": max_tokens * 32 * 32},
    )


def tiny_params(mdef, seed: int = 0):
    """Random parameters distributed as transformers initialises them (see the module docstring)."""
    shapes = jax.eval_shape(lambda k: init_params(mdef, k), jax.random.key(0))
    flat, tree = jax.tree_util.tree_flatten_with_path(shapes)
    keys = jax.random.split(jax.random.key(seed), len(flat))
    leaves = []
    for (path, x), k in zip(flat, keys):
        name = str(getattr(path[-1], "key", path[-1]))
        noise = jax.random.normal(k, x.shape, jnp.float32)
        if name.endswith("bias"):
            leaves.append(0.1 * noise)
        elif name.endswith(("scale", "norm")):
            leaves.append(1.0 + 0.1 * noise)
        else:
            leaves.append(0.02 * noise)
    return jax.tree_util.tree_unflatten(tree, leaves)


def build_tiny_base(path, seed: int = 0, corpus=None, vocab: int = 1024) -> Path:
    """A toy base as an HF directory: a tiny random Qwen3-VL, a BPE tokenizer trained on the toy
    corpus (so prompts stay short) with <emb> added, and an image processor. Written into a
    temporary sibling and renamed into place; no collective (process 0 alone builds it)."""
    path = Path(path)
    hf_cfg = tiny_hf_config(vocab=vocab)
    mdef = model_def(Qwen3VLConfig.from_hf_dict(hf_cfg.to_dict()))
    params = tiny_params(mdef, seed)
    tok = tiny_tokenizer(corpus, vocab_size=vocab - 16)
    tok.add_tokens(["<emb>"])
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        st.write_file(tmp / st.SINGLE_NAME, [(k, thunk()) for k, _, _, thunk in hf_tensors(mdef, params)])
        (tmp / "config.json").write_text(json.dumps(hf_cfg.to_dict(), indent=2, sort_keys=True))
        tok.save_pretrained(tmp)
        image_processor(min_tokens=4, max_tokens=16).save_pretrained(tmp)
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def toy_corpus(manifest) -> list[str]:
    """Every text of the toy datasets (queries, positives, T-CoTs), to train the toy tokenizer on."""
    texts = []
    for d in manifest["datasets"].values():
        raw = Path(d["path"]).read_text()
        rows = [json.loads(line) for line in raw.splitlines() if line.strip()] if d["format"] == "mmeb" else json.loads(raw)
        for row in rows:
            texts += list(_strings(row))
    return texts


def _strings(obj):
    if isinstance(obj, str):
        if not obj.endswith((".png", ".jpg")):
            yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)
