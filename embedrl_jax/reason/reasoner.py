"""The Reasoner: chat-style multimodal prompts in, sampled T-CoT completions out.

`prepare` renders prompts with the one input builder (generate mode: media first, then the
text; video frames as images, as the method feeds the Reasoner) and left-pads them;
`generate` runs the jitted prefill + KV-cache decode loop of `sampler.py` for n samples per
prompt, with the prompt length bucketed so a new prompt length rarely recompiles.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ..checkpoint import load_model
from ..data.inputs import InputBuilder, InputConfig, load_image_processor, load_tokenizer
from ..models.qwen3_vl.inputs import Buckets
from ..sharding import to_host
from .sampler import jitted_generate
from .sequences import pack_prompts, repeat_samples

GENERATE_INPUTS = InputConfig(video_as_images=True, padding_side="left", max_text_tokens=None)


@dataclasses.dataclass
class Generation:
    tokens: np.ndarray  # [B, n, T] int32, 0 after the end
    logprobs: np.ndarray  # [B, n, T] float32 log-probability of each sampled token
    mask: np.ndarray  # [B, n, T] bool, True for generated tokens (EOS included, stop-string tail excluded)
    texts: list[list[str]]  # [B][n] decoded completions


class Reasoner:
    def __init__(self, handle, tokenizer, image_processor, *, input_config: InputConfig = GENERATE_INPUTS,
                 max_prompt_tokens: int = 16384, buckets: Buckets = Buckets()):
        self.handle = handle
        self.tokenizer = tokenizer
        self.builder = InputBuilder(tokenizer, image_processor, handle.config, input_config)
        self.max_prompt_tokens = max_prompt_tokens
        self.buckets = buckets
        ids = {tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")}
        if tokenizer.eos_token_id is not None:
            ids.add(tokenizer.eos_token_id)
        self.eos_ids = tuple(sorted(i for i in ids if i is not None and i >= 0))

    @classmethod
    def from_pretrained(cls, path, *, mesh=None, dtype="float32", input_config: InputConfig = GENERATE_INPUTS,
                        **kw) -> "Reasoner":
        path = Path(path)
        handle = load_model(path, mesh=mesh, dtype=dtype, what="reasoner")
        tokenizer = load_tokenizer(path)
        return cls(handle, tokenizer, load_image_processor(path, handle.config), input_config=input_config, **kw)

    def replies(self, texts: Sequence[str], *, batch_size: int | None = None, max_new_tokens: int = 8,
                params=None, model_def=None) -> list[str]:
        """One greedy reply per text prompt, `batch_size` prompts at a time (e.g. a judge's verdicts)."""
        out, size = [], batch_size or len(texts)
        for i in range(0, len(texts), size):
            batch = self.prepare([{"text": t} for t in texts[i:i + size]])
            gen = self.generate(batch, n=1, max_new_tokens=max_new_tokens, temperature=0.0, params=params,
                                model_def=model_def)
            out += [t[0] for t in gen.texts]
        return out

    def prepare(self, prompts: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
        """One left-padded batch in transformers' input names (prompt items: text, images, video)."""
        # the builder names the item and field of a bad prompt (a dict passed alone is a TypeError)
        batch = self.builder.build(prompts, mode="generate")
        length = batch["input_ids"].shape[1]
        if length > self.max_prompt_tokens:
            raise ValueError(f"prompt of {length} tokens is longer than max_prompt_tokens={self.max_prompt_tokens}")
        return batch

    def pack(self, batch: Mapping[str, np.ndarray], n: int = 1) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Packed, left-padded arrays for a `prepare`d batch with n consecutive rows per prompt."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        inputs = {k: np.asarray(v) for k, v in batch.items()}
        length = inputs["input_ids"].shape[1]
        if length > self.max_prompt_tokens:
            raise ValueError(f"prompt of {length} tokens is longer than max_prompt_tokens={self.max_prompt_tokens}")
        (arrays,), (deltas,) = pack_prompts(self.handle.model_config, [inputs], self.buckets)
        return repeat_samples(arrays, deltas, n)

    def generate(self, batch: Mapping[str, np.ndarray], n: int = 1, max_new_tokens: int = 256,
                 temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0,
                 stop: Sequence[str] = (), *, params=None, model_def=None, key=None, dtype=None) -> Generation:
        """Sample n completions per prompt. `params` / `model_def` override the loaded weights
        (a policy in training); `key` overrides the PRNG key made from `seed`; `dtype` is the
        compute and KV-cache dtype (a trainer's compute dtype; None: the weights' own)."""
        if any(not s for s in stop):
            raise ValueError("stop strings must be non-empty")
        arrays, deltas = self.pack(batch, n)
        mdef = self.handle.model_def if model_def is None else model_def
        params = self.handle.params if params is None else params
        gen = jitted_generate(mdef, int(max_new_tokens), self.eos_ids, float(temperature), int(top_k), float(top_p),
                              dtype=dtype)
        key = jax.random.key(seed) if key is None else key
        with jax.set_mesh(self.handle.mesh):
            toks, lps, mask = gen(params, arrays, jnp.asarray(deltas, jnp.int32), key)
        toks, lps, mask = (np.array(to_host(x)) for x in (toks, lps, mask))
        texts = []
        for row in range(toks.shape[0]):
            keep = mask[row]
            text = _decode(self.tokenizer, toks[row][keep])
            for s in stop:
                cut = text.find(s)
                if cut >= 0:
                    text = text[: cut + len(s)]
                    mask[row] = keep & (np.cumsum(keep) <= _tokens_for(self.tokenizer, toks[row][keep], cut + len(s)))
            texts.append(text)
        b = toks.shape[0] // n
        shape = (b, n, toks.shape[1])
        return Generation(toks.reshape(shape), lps.reshape(shape), mask.reshape(shape),
                          [texts[i * n:(i + 1) * n] for i in range(b)])


def _decode(tokenizer, tokens) -> str:
    """Decoded completion; undecodable byte sequences come back as U+FFFD, never an exception."""
    ids = [int(t) for t in np.asarray(tokens).reshape(-1) if 0 <= int(t) < 2**31]  # ids the tokenizer can take
    return tokenizer.decode(ids, skip_special_tokens=True)


def _tokens_for(tokenizer, tokens, n_chars: int) -> int:
    """How many leading tokens decode to the first n_chars characters of the completion.

    A character split over several byte tokens (a multi-byte UTF-8 character) counts only when
    all its tokens are in: a partial one decodes to U+FFFD, which has the length but not the
    text. Binary search for the first prefix that is long enough (decoded length grows with
    the prefix), then the first from there whose text matches.
    """
    tokens = list(np.asarray(tokens).reshape(-1))
    if n_chars <= 0:
        return 0
    target = _decode(tokenizer, tokens)[:n_chars]
    lo, hi = 1, len(tokens)
    while lo < hi:
        mid = (lo + hi) // 2
        if len(_decode(tokenizer, tokens[:mid])) >= n_chars:
            hi = mid
        else:
            lo = mid + 1
    for k in range(lo, len(tokens) + 1):
        if _decode(tokenizer, tokens[:k])[:n_chars] == target:
            return k
    return lo
