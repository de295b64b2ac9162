"""`embedrl serve`: an OpenAI-compatible embeddings server that can reason before it embeds.

Modules: :mod:`.config` (ServeConfig), :mod:`.schema` (request checks, OpenAI errors),
:mod:`.engine` (shape plan, warm-up, batch runs), :mod:`.batcher` (dynamic batching),
:mod:`.metrics` (Prometheus text, compilation counter), :mod:`.app` (Starlette routes),
:mod:`.cli` (the verb and the uvicorn runner). Imports are lazy: jax loads with the engine.
"""
from .config import ReasonServeConfig, ServeConfig

__all__ = ["ServeConfig", "ReasonServeConfig"]
