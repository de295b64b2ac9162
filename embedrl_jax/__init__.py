"""embedrl_jax: Embed-RL (reasoning-driven multimodal embeddings) in JAX/Flax.

The public surface is resolved lazily so that `import embedrl_jax` stays cheap and the
CLI can set XLA flags before jax initialises a backend.
"""
from importlib import import_module

__all__ = ["load_hf", "save_hf", "Embedder", "Reasoner", "tcot", "rl"]

_LAZY = {
    "load_hf": ("embedrl_jax.hf", "load_hf"),
    "save_hf": ("embedrl_jax.hf", "save_hf"),
    "Embedder": ("embedrl_jax.embed.embedder", "Embedder"),
    "Reasoner": ("embedrl_jax.reason.reasoner", "Reasoner"),
    "tcot": ("embedrl_jax.tcot", None),
    "rl": ("embedrl_jax.rl", None),
}


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'embedrl_jax' has no attribute {name!r}")
    module_name, attr = _LAZY[name]
    module = import_module(module_name)
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value
    return value
