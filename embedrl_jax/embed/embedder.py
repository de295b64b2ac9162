"""The Embedder: Qwen3-VL final-norm hidden state at the last ``<emb>`` token, L2-normalised (§3).

    emb = Embedder.from_pretrained("path/to/embed-rl-2b")         # HF dir or orbax dir
    vecs = emb.encode([{"text": "a cat"}, {"images": ["cat.jpg"], "text": "find it"}])

Items follow :mod:`embedrl_jax.data.inputs`. ``prepare`` builds one padded numpy batch in
transformers' input names (so the same batch can be fed to transformers for parity checks);
``embed_batch`` runs one jitted forward + pooling; ``encode`` batches a list of items by
modality so that each batch is homogeneous, and restores the input order.
"""
from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from ..checkpoint import load_model
from ..data.inputs import InputBuilder, InputConfig, item_signature, load_image_processor, load_tokenizer
from ..sharding import to_host

# load_tokenizer / load_image_processor live with the input builder; re-exported for old callers
__all__ = ["Embedder", "pool_at_token", "l2_normalize", "load_tokenizer", "load_image_processor"]


def pool_at_token(hidden, input_ids, attention_mask, token_id):
    """hidden [B, L, D] at the last valid position holding `token_id` in each row -> [B, D].

    Rows without the token fall back to their last valid (attention_mask = 1) position.
    """
    mask = attention_mask.astype(bool)
    length = input_ids.shape[1]
    pos = jnp.arange(length)
    hit = (input_ids == token_id) & mask
    last_hit = jnp.max(jnp.where(hit, pos, -1), axis=1)
    last_valid = jnp.max(jnp.where(mask, pos, -1), axis=1)
    index = jnp.where(last_hit >= 0, last_hit, jnp.maximum(last_valid, 0))
    return jnp.take_along_axis(hidden, index[:, None, None], axis=1)[:, 0]


def l2_normalize(x, eps: float = 1e-12):
    """x / max(||x||, eps) along the last axis, in float32."""
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def embed_rows(mdef, params, batch, token_id, *, dtype, remat=False, rng=None):
    """[B, D] L2-normalised <emb> embeddings of a packed batch (the Embedder's and the trainer's forward)."""
    hidden = mdef.hidden(params, batch, dtype=dtype, remat=remat, rng=rng)
    return l2_normalize(pool_at_token(hidden, batch["input_ids"], batch["attention_mask"], token_id))


@functools.lru_cache(maxsize=8)
def _jitted_embed(mdef):
    """One jitted forward per model definition (ModelDef is hashable): Embedders of the same
    architecture, e.g. one loaded from HF and one from orbax, share compilations."""
    return jax.jit(functools.partial(embed_rows, mdef), static_argnames=("dtype",))


class Embedder:
    """A loaded Embedder: model handle, tokenizer with ``<emb>``, input builder, jitted pooling."""

    def __init__(self, handle, tokenizer, image_processor, *, input_config: InputConfig | None = None):
        self.handle = handle
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.input_config = input_config or InputConfig()
        emb = self.input_config.emb_token
        if emb not in tokenizer.get_vocab():
            tokenizer.add_tokens([emb])
        tok_id = int(tokenizer.convert_tokens_to_ids(emb))
        vocab = handle.model_config.text.vocab_size
        if tok_id >= vocab:
            raise ValueError(
                f"{emb!r} has id {tok_id} in the tokenizer, outside the model's vocab of {vocab} rows "
                "(the embedding matrix is not resized; use a tokenizer whose <emb> reuses a spare row)"
            )
        cfg_ids = handle.model_config.emb_token_ids or getattr(handle.config, "emb_token_ids", None)
        if cfg_ids:
            if tok_id not in [int(i) for i in cfg_ids]:
                raise ValueError(
                    f"config.json emb_token_ids {list(cfg_ids)} disagrees with the tokenizer's {emb!r} id {tok_id}"
                )
        self.emb_token_ids = [tok_id]
        self.builder = InputBuilder(tokenizer, image_processor, handle.config, self.input_config)
        self._embed = _jitted_embed(handle.model_def)

    @classmethod
    def from_pretrained(cls, path, *, mesh=None, dtype="float32", input_config: InputConfig | None = None) -> "Embedder":
        """Load an HF directory (config.json + safetensors + tokenizer [+ preprocessor_config.json])
        or an orbax directory from `embedrl_jax.checkpoint.save_params` / `save_handle` (has `params/`)."""
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"embedder directory {path} does not exist")
        handle = load_model(path, mesh=mesh, dtype=dtype, what="embedder")
        config = input_config or InputConfig()
        tokenizer = load_tokenizer(path, config.emb_token)
        processor = load_image_processor(path, handle.config)
        return cls(handle, tokenizer, processor, input_config=config)

    # ------------------------------------------------------------------ properties
    @property
    def emb_token_id(self) -> int:
        return self.emb_token_ids[0]

    @property
    def dim(self) -> int:
        """Embedding width (the LLM hidden size)."""
        return int(self.handle.model_config.text.hidden_size)

    # ------------------------------------------------------------------ batches
    def prepare(self, items: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
        """One padded batch (numpy, transformers input names) for `items`."""
        return self.builder.build(items, mode="embed")

    def embed_batch(self, batch: Mapping[str, np.ndarray]) -> np.ndarray:
        """[B, D] float32 L2-normalised embeddings of a `prepare`d batch."""
        packed, info = self.handle.prepare(**batch)
        with jax.set_mesh(self.handle.mesh):
            out = self._embed(self.handle.params, packed, jnp.int32(self.emb_token_id), dtype=self.handle.dtype)
        return to_host(out).astype(np.float32)[: info["batch"]]

    def encode(self, items: Sequence[Mapping[str, Any]], batch_size: int = 16, *, dim: int | None = None,
               progress: bool | None = None) -> np.ndarray:
        """[N, D] (or [N, dim]) float32 embeddings in input order.

        Items are grouped by modality signature (text-only / image / video, number of images and
        evidence images) so every batch is homogeneous; groups are encoded in order of first
        appearance and the results put back in input order. `dim` truncates to the first `dim`
        dimensions and re-normalises (Matryoshka). A tqdm bar is shown when N > batch_size, or
        when `progress` is True (False hides it).
        """
        items = list(items)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if dim is not None and not (1 <= dim <= self.dim):
            raise ValueError(f"dim must be in [1, {self.dim}], got {dim}")
        width = self.dim if dim is None else dim
        out = np.zeros((len(items), width), np.float32)
        if not items:
            return out
        groups: dict[tuple, list[int]] = {}
        for i, item in enumerate(items):
            groups.setdefault(item_signature(item), []).append(i)
        show = len(items) > batch_size if progress is None else bool(progress)
        with tqdm(total=len(items), disable=not show, desc="embed", unit="item") as bar:
            for indices in groups.values():
                for start in range(0, len(indices), batch_size):
                    chunk = indices[start : start + batch_size]
                    try:
                        batch = self.prepare([items[i] for i in chunk])
                    except ValueError as e:
                        raise _renumber(e, chunk) from None
                    vecs = self.embed_batch(batch)
                    if dim is not None:
                        vecs = vecs[:, :dim]
                        vecs = vecs / np.maximum(np.linalg.norm(vecs, axis=-1, keepdims=True), 1e-12)
                    out[chunk] = vecs
                    bar.update(len(chunk))
        return out

    def __call__(self, items, **kw) -> np.ndarray:
        return self.encode(items, **kw)


def _renumber(err: ValueError, chunk: list[int]) -> ValueError:
    """Rewrite 'item k:' (index within a batch) to the index in the caller's list."""
    msg = str(err)
    m = re.match(r"item (\d+):", msg)
    if m and int(m.group(1)) < len(chunk):
        msg = f"item {chunk[int(m.group(1))]}:" + msg[m.end():]
    return ValueError(msg)
