"""T-CoT prompt templates, kept as data so that users can override them.

The default templates live in ``tcot_prompts.json`` next to this module. The file has three
top-level keys:

- ``"defaults"``: default slot values (``num_frames`` = 8, ``fps`` = 2 for the video prompts);
- ``"templates"``: ``kind -> template``; a template is a string or a list of lines (joined with
  ``"\\n"``), so that long prompts stay readable in JSON;
- ``"evidence_keys"``: ``kind -> JSON key`` the template's worked example uses (documentation and
  tests; ``None`` for the judge).

Kinds: ``query_text``, ``query_image``, ``query_video``, ``query_text_video_retrieval``,
``positive_image``, ``positive_text``, ``positive_video`` (generation prompts, slot ``{task}``;
the two video prompts also use ``{num_frames}`` and ``{fps}``) and ``judge`` (slots ``{query}``,
``{reasoning}``, ``{candidates}``; build ``{candidates}`` with :func:`format_candidates`).

Slots are written ``{name}`` with ``name`` a Python identifier. Any other brace, such as the JSON
objects in the worked examples, is literal text, so templates need no brace escaping. Rendering a
template with a slot that has neither a value nor a default raises ``KeyError(slot_name)``.

Overriding: ``load_prompts(path)`` reads a JSON file with the same layout and merges it over the
defaults (a user file may hold only the templates it changes).
"""
from __future__ import annotations

import copy
import json
import os
import re
from functools import lru_cache
from importlib import resources
from typing import Any, Mapping, Sequence

__all__ = [
    "KINDS",
    "GENERATION_KINDS",
    "DEFAULT_PROMPTS_FILE",
    "load_prompts",
    "render",
    "slots_of",
    "format_candidates",
    "prompt_kind",
    "reasoner_prompt",
]

GENERATION_KINDS = (
    "query_text",
    "query_image",
    "query_video",
    "query_text_video_retrieval",
    "positive_image",
    "positive_text",
    "positive_video",
)
KINDS = GENERATION_KINDS + ("judge",)
DEFAULT_PROMPTS_FILE = "tcot_prompts.json"

_SLOT = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


@lru_cache(maxsize=1)
def _default_prompts_text() -> str:
    return resources.files(__name__).joinpath(DEFAULT_PROMPTS_FILE).read_text(encoding="utf-8")


def _merge(base: dict, override: Mapping) -> dict:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(dict(out[key]), value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_prompts(path: str | os.PathLike | None = None) -> dict:
    """Return the prompt set ``{"defaults": ..., "templates": ..., "evidence_keys": ...}``.

    With ``path``, the JSON file there is merged over the packaged defaults (nested dicts merge key
    by key, so a file may override a single template or a single default). Templates given as a
    list of lines are joined with newlines. The result is a fresh dict the caller may modify.
    """
    prompts = json.loads(_default_prompts_text())
    if path is not None:
        with open(path, encoding="utf-8") as f:
            user = json.load(f)
        if not isinstance(user, Mapping):
            raise ValueError(f"{os.fspath(path)}: expected a JSON object at the top level")
        prompts = _merge(prompts, user)
    prompts.setdefault("defaults", {})
    prompts.setdefault("evidence_keys", {})
    templates = prompts.setdefault("templates", {})
    for kind, template in list(templates.items()):
        if isinstance(template, (list, tuple)):
            templates[kind] = "\n".join(str(line) for line in template)
        elif not isinstance(template, str):
            raise ValueError(f"template {kind!r} must be a string or a list of lines")
    return prompts


def slots_of(template: str) -> list[str]:
    """The slot names used in ``template``, in first-use order."""
    seen: dict[str, None] = {}
    for m in _SLOT.finditer(template):
        seen.setdefault(m.group(1), None)
    return list(seen)


def render(kind: str, /, prompts: Mapping | None = None, **slots: Any) -> str:
    """Render template ``kind`` with ``slots`` (falling back to ``prompts["defaults"]``).

    Raises ``KeyError`` for an unknown kind or a slot with no value (the key is the slot's name).
    Slots that the template does not use are ignored.
    """
    prompts = load_prompts() if prompts is None else prompts
    templates = prompts.get("templates", {})
    if kind not in templates:
        raise KeyError(kind)
    template = templates[kind]
    if isinstance(template, (list, tuple)):
        template = "\n".join(str(line) for line in template)
    values = {**prompts.get("defaults", {}), **slots}
    for name in slots_of(template):
        if name not in values:
            raise KeyError(name)
    return _SLOT.sub(lambda m: str(values[m.group(1)]), template)


def format_candidates(candidates: Sequence[str]) -> str:
    """Number candidate reasonings ``1. ...``, ``2. ...`` (one per paragraph) for the judge prompt."""
    return "\n\n".join(f"{i}. {str(c).strip()}" for i, c in enumerate(candidates, start=1))


def prompt_kind(item: Mapping[str, Any], side: str, *, retrieves_video: bool = False) -> str:
    """The generation template for one side of a pair (method §8's rollout prompt choice).

    ``side`` is ``"query"`` or ``"positive"``; a text-only query whose positive is a video uses
    the video-retrieval query prompt (``retrieves_video``).
    """
    if side not in ("query", "positive"):
        raise ValueError(f"side must be 'query' or 'positive', got {side!r}")
    if item.get("video"):
        modality = "video"
    elif item.get("images") or item.get("image") is not None:
        modality = "image"
    else:
        modality = "text"
    if side == "query" and modality == "text" and retrieves_video:
        return "query_text_video_retrieval"
    return f"{side}_{modality}"


def reasoner_prompt(item: Mapping[str, Any], side: str, prompts: Mapping | None = None, *,
                    retrieves_video: bool = False) -> dict:
    """The Reasoner's prompt item for an Embedder item: its media plus the rendered template,
    with the item's own text (instruction first) in the ``{task}`` slot."""
    kind = prompt_kind(item, side, retrieves_video=retrieves_video)
    task = " ".join(str(item[k]).strip() for k in ("instruction", "text") if item.get(k))
    out = {"text": render(kind, prompts, task=task)}
    if item.get("images"):
        out["images"] = list(item["images"])
    elif item.get("image") is not None:
        out["images"] = [item["image"]]
    if item.get("video"):
        out["video"] = list(item["video"])
    return out
