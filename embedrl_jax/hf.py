"""Hugging Face checkpoints in and out: `load_hf` streams safetensors into sharded params,
`save_hf` writes them back through the same mapping table, atomically.

Both take local paths or object-store URLs (fsutil): weights are streamed through epath, the
config, tokenizer and processor files are read from a local copy (transformers reads local files).
"""
from __future__ import annotations

import functools
import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.sharding import NamedSharding

from . import safetensors_io as st
from .errors import MissingFileError
from .fsutil import COMMIT_MARKER, as_path, local_copy, local_staging, replace_dir, require, sync_processes
from .models.qwen3_vl.attention import buckets_for
from .models.qwen3_vl.config import Qwen3VLConfig
from .models.qwen3_vl.inputs import HF_INPUT_NAMES, Buckets, pack_inputs
from .models.qwen3_vl.mapping import Mapping, Row, get_path, set_path, stack_size
from .models.qwen3_vl.model import ModelDef, model_def
from .sharding import MeshConfig, logical_to_spec, make_mesh, to_host, tree_shardings

log = logging.getLogger(__name__)

SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.json",
    "chat_template.jinja",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "processor_config.json",
    "generation_config.json",
)

# logical names of the model's input arrays (leading dims), for placing batches on a mesh
BATCH_AXES = {
    "input_ids": ("batch", None),
    "attention_mask": ("batch", None),
    "positions": (None, "batch", None),
    "visual_index": ("batch", None),
    "patches": ("batch", None, None),
    "segment_ids": ("batch", None),
    "pos_idx": ("batch", None, None),
    "pos_w": ("batch", None, None),
    "rowcol": ("batch", None, None),
}


def np_dtype(dtype) -> np.dtype:
    if isinstance(dtype, str) and dtype in ("bfloat16", "bf16"):
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(jnp.dtype(dtype))


def single_device_mesh():
    return make_mesh(MeshConfig(1, 1, 1), devices=jax.devices()[:1])


def batch_shardings(arrays: dict[str, np.ndarray], mesh) -> dict[str, NamedSharding]:
    return {k: NamedSharding(mesh, logical_to_spec(BATCH_AXES[k], v.shape, mesh)) for k, v in arrays.items()}


def copy_side_files(src: Path | None, dst: Path) -> list[str]:
    """Tokenizer and processor files travel with the weights."""
    copied = []
    if src is None:
        return copied
    for name in SIDE_FILES:
        if (as_path(src) / name).exists():
            (as_path(src) / name).copy(as_path(dst) / name, overwrite=True)
            copied.append(name)
    return copied


class Qwen3VLHandle:
    """A loaded model: config, plain param pytree on a mesh, and a jitted logits entry point."""

    def __init__(self, config, mdef: ModelDef, params, mesh, *, source: Path | None = None,
                 source_dtypes: dict[str, np.dtype] | None = None, buckets: Buckets = Buckets()):
        self.config = config  # transformers' config object, read from config.json
        self.model_def = mdef
        self.params = params
        self.mesh = mesh
        self.source = source
        self.source_dtypes = source_dtypes or {}
        self.buckets = buckets
        self._logits = jax.jit(mdef.logits, static_argnames=("dtype", "remat"))

    @property
    def model_config(self) -> Qwen3VLConfig:
        return self.model_def.config

    @property
    def dtype(self):
        return jax.tree.leaves(self.params)[0].dtype

    def prepare(self, **inputs) -> tuple[dict[str, jax.Array], dict]:
        unknown = set(inputs) - set(HF_INPUT_NAMES) - {"position_ids"}
        if unknown:
            raise TypeError(f"unexpected inputs {sorted(unknown)}; expected transformers names {HF_INPUT_NAMES}")
        arrays, info = pack_inputs(self.model_config, **{k: _to_numpy(v) for k, v in inputs.items()}, buckets=self.buckets)
        shardings = batch_shardings(arrays, self.mesh)
        return {k: jax.device_put(v, shardings[k]) for k, v in arrays.items()}, info

    def logits(self, **inputs) -> np.ndarray:
        """[batch, seq, vocab] float32 logits for transformers-named numpy inputs."""
        batch, info = self.prepare(**inputs)
        with jax.set_mesh(self.mesh):
            out = self._logits(self.params, batch, dtype=self.dtype)
        return to_host(out)[:, : info["length"]]


def _to_numpy(x):
    if x is None:
        return None
    if hasattr(x, "detach"):  # torch tensors
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def read_hf_config(path: str | Path):
    """(transformers config object, our model config), with a clear error for other models.
    `path` may be an object-store URL (transformers reads a local copy of the small files)."""
    if not as_path(path).joinpath("config.json").exists():
        raise MissingFileError(f"no config.json in {path}")
    local = local_copy(path, side_files_only=True)
    raw = json.loads((local / "config.json").read_text())
    ours = Qwen3VLConfig.from_hf_dict(raw)  # raises naming model_type if unsupported
    from transformers import AutoConfig

    hf_cfg = AutoConfig.from_pretrained(local, local_files_only=True)
    hf_cfg.name_or_path = os.fspath(path)  # the directory named, not its local copy
    return hf_cfg, ours


def param_shardings(mdef: ModelDef, mesh):
    return tree_shardings(mdef.param_axes(), mdef.abstract_params(), mesh)


def load_params(path: str | Path, mdef: ModelDef, mesh, dtype=np.float32):
    """Stream every tensor from safetensors straight into its device shards.

    Each parameter is built with `jax.make_array_from_callback`: a device's callback
    reads (memory-mapped) only the HF tensors of the layers in its shard, transforms
    them and slices out its block, so no host ever holds the whole model.
    """
    reader = st.CheckpointReader(path)
    mapping = Mapping(mdef.config)
    target = np_dtype(dtype)
    abstract = mdef.abstract_params()
    shardings = param_shardings(mdef, mesh)
    expected = set(mapping.hf_keys())
    present = set(reader.keys())
    missing = sorted(expected - present)
    if missing:
        raise ValueError(f"checkpoint {path} is missing tensors: {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    unexpected = sorted(present - expected)
    if unexpected == ["lm_head.weight"] and mdef.config.tie_word_embeddings:
        log.warning("tied model: ignoring the redundant lm_head.weight in %s", path)
        unexpected = []
    if unexpected:
        raise ValueError(f"checkpoint {path} has unexpected tensors: {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    source_dtypes = {k: reader.info(k)[0] for k in expected}

    by_path: dict[tuple[str, ...], Row] = {}
    for row in mapping.rows:
        by_path[row.path] = row

    for row in mapping.rows:  # every shape is checked before any data is read
        leaf = get_path(abstract, row.path)
        want = mapping.hf_shape(row, tuple(leaf.shape[1:] if row.stack else leaf.shape))
        for i in range(stack_size(mdef.config, row.stack)):
            key = row.hf.format(i=i)
            got = reader.info(key)[1]
            if tuple(got) != tuple(want):
                raise ValueError(
                    f"tensor {key} has shape {tuple(got)} but parameter {'/'.join(row.path)} expects {tuple(want)}"
                )

    params: dict[str, Any] = {}
    for path_, row in by_path.items():
        leaf = get_path(abstract, path_)
        sharding = get_path(shardings, path_)
        shape = tuple(leaf.shape)
        n = stack_size(mdef.config, row.stack)
        layer_shape = shape[1:] if row.stack else shape

        @functools.lru_cache(maxsize=None)
        def layer(i, row=row, layer_shape=layer_shape):
            hf = np.asarray(reader.get(row.hf.format(i=i)))
            return mapping.to_jax(row, hf, layer_shape).astype(target)

        def callback(index, row=row, n=n, layer=layer):
            if row.stack is None:
                return layer(0)[index]
            layers = range(*index[0].indices(n))
            return np.stack([layer(i)[index[1:]] for i in layers])

        set_path(params, path_, jax.make_array_from_callback(shape, sharding, callback))
        layer.cache_clear()
    return params, source_dtypes


def load_hf(path, *, dtype="float32", mesh=None, buckets: Buckets = Buckets(), attention: str = "auto") -> Qwen3VLHandle:
    """Load a Qwen3-VL HF directory (config.json + safetensors) onto `mesh` (default: one device).

    `path` is a local directory or an object-store URL (gs://..., through fsutil). `attention`:
    the kernel of the handle's `logits` (auto | xla | splash | cudnn, `models/qwen3_vl/attention.py`),
    checked against the mesh's platform here; where it is splash, padded lengths round to
    splash's block multiple (`Buckets.for_attention`)."""
    path = require(path, "Hugging Face model directory")
    hf_cfg, ours = read_hf_config(path)
    mesh = mesh if mesh is not None else single_device_mesh()
    ours = ours.replace(attention=attention)
    buckets = buckets_for(buckets, attention, mesh)
    mdef = model_def(ours)
    params, source_dtypes = load_params(path, mdef, mesh, dtype)
    return Qwen3VLHandle(hf_cfg, mdef, params, mesh, source=path, source_dtypes=source_dtypes, buckets=buckets)


# ------------------------------------------------------------------------ export
def hf_tensors(mdef: ModelDef, params, source_dtypes=None, dtype=None):
    """Yield (hf_key, shape, dtype, thunk) in table order; thunks fetch one layer at a time."""
    mapping = Mapping(mdef.config)
    source_dtypes = source_dtypes or {}
    for key, parts in mapping.grouped_by_hf_key().items():
        row0 = parts[0][0]

        def thunk(parts=parts, key=key):
            pieces = []
            for row, i in parts:
                leaf = get_path(params, row.path)
                one = to_host(leaf[i] if row.stack else leaf)
                pieces.append(mapping.to_hf(row, one))
            out = pieces[0] if len(pieces) == 1 else np.concatenate(pieces, axis=0)
            want = np.dtype(dtype) if dtype is not None else source_dtypes.get(key, out.dtype)
            return out.astype(want, copy=False)

        leaf = get_path(params, row0.path)
        shape = mapping.hf_shape(row0, tuple(leaf.shape[1:] if row0.stack else leaf.shape))
        want = np.dtype(dtype) if dtype is not None else source_dtypes.get(key, np.dtype(leaf.dtype))
        yield key, shape, np.dtype(want), thunk


def save_hf(handle: Qwen3VLHandle, out_dir, *, max_shard_bytes: int = 5 * 2**30, dtype=None,
            overwrite: bool = False, extra_config: dict | None = None, write_extra=None) -> Path:
    """Write config.json + safetensors (sharded with an index above `max_shard_bytes`).

    Everything is written into a temporary sibling directory that is renamed into place
    at the end, so a failure never leaves a half-written export; `write_extra(tmp_dir)` adds
    files (a tokenizer, an image processor) before that. Tensors keep the dtype they were
    loaded with unless `dtype` is given. In a multi-host run every process must call this
    (each tensor is gathered collectively) and process 0 alone writes. `out_dir` may be an
    object-store URL: it is then complete once its commit marker is written (fsutil).
    """
    out_dir = as_path(out_dir)
    primary = jax.process_index() == 0
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty (pass overwrite=True to replace it)")
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    if primary:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    try:
        tensors = list(hf_tensors(handle.model_def, handle.params, handle.source_dtypes, dtype))
        sizes = [(k, int(np.prod(s, dtype=np.int64)) * d.itemsize) for k, s, d, _ in tensors]
        shards = st.plan_shards(iter(sizes), max_shard_bytes)
        thunks = {k: t for k, _, _, t in tensors}
        weight_map = {}
        names = (
            [st.SINGLE_NAME]
            if len(shards) == 1
            else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        )
        for name, keys in zip(names, shards):
            if primary:
                st.write_file(tmp / name, [(k, thunks[k]()) for k in keys])
            else:
                for k in keys:  # the gathers are collective: every process takes part, in order
                    thunks[k]()
            weight_map.update({k: name for k in keys})
        if primary:
            if len(shards) > 1:
                index = {"metadata": {"total_size": sum(s for _, s in sizes)}, "weight_map": weight_map}
                (tmp / st.INDEX_NAME).write_text(json.dumps(index, indent=2))
            cfg = handle.config.to_dict() if hasattr(handle.config, "to_dict") else dict(handle.config)
            cfg["tie_word_embeddings"] = handle.model_config.tie_word_embeddings
            if handle.model_config.emb_token_ids:
                cfg["emb_token_ids"] = list(handle.model_config.emb_token_ids)
            cfg.update(extra_config or {})
            (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
            copy_side_files(handle.source, tmp)
            if write_extra is not None:
                local, finish = local_staging(tmp)  # save_pretrained writes local files only
                write_extra(local)
                finish()
            (tmp / COMMIT_MARKER).write_text("published\n")
            replace_dir(tmp, out_dir)
    except BaseException:
        if primary and tmp.exists():
            tmp.rmtree()
        raise
    finally:
        sync_processes("embedrl_save_hf")  # no process reads the export before process 0 has published it
    return out_dir
