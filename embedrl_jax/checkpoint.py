"""Model parameters as an orbax checkpoint directory, the native format between runs.

    DIR/
      params/         orbax StandardSave of the plain param pytree (OCDBT)
      config.json     the HF config.json of the model (so `read_hf_config(DIR)` works)
      tokenizer*.json, preprocessor_config.json, ...   copied from the source, when present

The whole directory is written under a temporary sibling name and renamed into place, so
it either appears complete or not at all. Restores go through an abstract target of
`jax.ShapeDtypeStruct(..., sharding=NamedSharding)` built from the model's logical axes,
so every shard is read straight onto its device, on whatever mesh is given now.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from .fsutil import COMMIT_MARKER, as_path, replace_dir, sync_processes
from .hf import (Qwen3VLHandle, copy_side_files, load_hf, np_dtype, param_shardings, read_hf_config,
                 single_device_mesh)
from .models.qwen3_vl.attention import buckets_for
from .models.qwen3_vl.inputs import Buckets
from .models.qwen3_vl.model import ModelDef, model_def

PARAMS_DIR = "params"
CONFIG_NAME = "config.json"


def _checkpointer():
    return ocp.Checkpointer(ocp.StandardCheckpointHandler())


def _key(path) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in path)


def _paths(tree) -> dict[str, Any]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {_key(path): leaf for path, leaf in flat}


def save_params(directory, params, *, config_json: dict, side_files_from=None, overwrite: bool = False) -> Path:
    """Write `params` (any pytree of jax arrays, sharded or not) to `directory/params` with orbax.

    `config_json` is written as `directory/config.json`; tokenizer and processor files are
    copied from `side_files_from`. Every process must call this (orbax saves collectively);
    only process 0 touches the directory layout.
    """
    directory = as_path(directory, absolute=True)  # a local path or an object-store URL
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())) and not overwrite:
        raise FileExistsError(f"{directory} exists and is not empty")
    tmp = directory.parent / f".{directory.name}.tmp-orbax"  # the same name on every host
    primary = jax.process_index() == 0
    if primary:
        if tmp.exists():
            tmp.rmtree()  # left over from a crashed save
        tmp.mkdir(parents=True)
    sync_processes("embedrl_save_params_start")
    try:
        _checkpointer().save(tmp / PARAMS_DIR, args=_standard_save(params))
        if primary:
            (tmp / CONFIG_NAME).write_text(json.dumps(config_json, indent=2, sort_keys=True))
            copy_side_files(side_files_from, tmp)
            (tmp / COMMIT_MARKER).write_text("published\n")
            replace_dir(tmp, directory)
    except BaseException:
        if primary and tmp.exists():
            tmp.rmtree()
        raise
    sync_processes("embedrl_save_params_done")
    return directory


def _standard_save(params):
    return ocp.args.StandardSave(params)


def hf_config_json(handle: Qwen3VLHandle) -> dict:
    """The HF config.json for a handle, its `dtype` field naming the dtype of the params."""
    cfg = handle.model_config.to_hf_dict()
    for key in ("dtype", "torch_dtype"):
        if key in cfg:
            cfg[key] = np.dtype(handle.dtype).name
    return cfg


def save_handle(directory, handle: Qwen3VLHandle, *, overwrite: bool = False) -> Path:
    """`save_params` for a loaded model: its params, HF config and tokenizer/processor files."""
    return save_params(directory, handle.params, config_json=hf_config_json(handle),
                       side_files_from=handle.source, overwrite=overwrite)


def stored_metadata(directory) -> dict[str, Any]:
    """{'a/b/c': ArrayMetadata(shape, dtype, ...)} of the params stored under `directory`."""
    path = as_path(directory, absolute=True) / PARAMS_DIR
    if not path.is_dir():
        raise FileNotFoundError(f"no orbax params in {directory} (expected {path})")
    meta = _checkpointer().metadata(path).item_metadata
    return _paths(getattr(meta, "tree", meta))


def restore_params(directory, mdef: ModelDef, mesh, dtype=None):
    """Restore the params under `directory` directly into the shards `param_shardings` gives on
    `mesh` (resharding if the checkpoint was written on another mesh), cast to `dtype` if given.
    """
    stored = stored_metadata(directory)
    abstract = mdef.abstract_params()
    shardings = param_shardings(mdef, mesh)
    want = _paths(abstract)
    missing, unexpected = sorted(set(want) - set(stored)), sorted(set(stored) - set(want))
    if missing or unexpected:
        raise ValueError(f"checkpoint {directory} does not match the model: missing {missing[:8]}, unexpected {unexpected[:8]}")
    for key, leaf in want.items():
        if tuple(stored[key].shape) != tuple(leaf.shape):
            raise ValueError(f"parameter {key} has shape {tuple(stored[key].shape)} in {directory}, model expects {tuple(leaf.shape)}")
    target_dtype = np_dtype(dtype) if dtype is not None else None

    def spec(path, leaf, sharding):
        stored_dtype = np.dtype(stored[_key(path)].dtype)
        return jax.ShapeDtypeStruct(leaf.shape, target_dtype or stored_dtype, sharding=sharding)

    target = jax.tree_util.tree_map_with_path(spec, abstract, shardings)
    path = as_path(directory, absolute=True) / PARAMS_DIR
    return _checkpointer().restore(path, args=ocp.args.StandardRestore(target))


def load_orbax(directory, mesh=None, dtype=None, *, buckets: Buckets = Buckets(), attention: str = "auto") -> Qwen3VLHandle:
    """A `Qwen3VLHandle` from a `save_params` directory, on `mesh` (default: one device).

    HF export of the handle writes tensors in the dtype the params were restored in.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory {directory} does not exist")
    hf_cfg, ours = read_hf_config(directory)
    mesh = mesh if mesh is not None else single_device_mesh()
    ours = ours.replace(attention=attention)
    buckets = buckets_for(buckets, attention, mesh)
    mdef = model_def(ours)
    params = restore_params(directory, mdef, mesh, dtype)
    # no source dtypes: export falls back to each parameter's own (restored) dtype
    return Qwen3VLHandle(hf_cfg, mdef, params, mesh, source=directory, source_dtypes={}, buckets=buckets)


def load_model(path, *, mesh=None, dtype="float32", what="model", attention: str = "auto") -> Qwen3VLHandle:
    """Either kind of model directory a user may hand us: orbax (has `params/`, from
    `save_params` / `save_handle` / a trainer's checkpoint export) or Hugging Face."""
    path = Path(path)
    if (path / "params").is_dir():
        return load_orbax(path, mesh=mesh, dtype=dtype, attention=attention)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{what} directory {path}: no config.json (Hugging Face) or params/ (orbax)")
    return load_hf(path, dtype=dtype, mesh=mesh, attention=attention)
