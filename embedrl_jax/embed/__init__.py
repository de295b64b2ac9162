"""Embedder (`<emb>`-token pooled Qwen3-VL embeddings, method reference §3) and its losses.

Names are resolved lazily, so importing a submodule (e.g. `embedrl_jax.embed.losses`) does not
load the Embedder's dependencies.
"""
from importlib import import_module

__all__ = ["Embedder", "pool_at_token", "l2_normalize"]

_LAZY = {name: "embedrl_jax.embed.embedder" for name in __all__}


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'embedrl_jax.embed' has no attribute {name!r}")
    value = getattr(import_module(_LAZY[name]), name)
    globals()[name] = value
    return value
