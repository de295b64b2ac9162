"""The `/v1/embeddings` request: OpenAI fields plus ours, checked field by field.

Errors are :class:`APIError` (status, OpenAI error shape). `parse_request` checks structure
only (cheap, on the event loop); `load_item` decodes the media of one item (in the
preparation thread) and names ``input[i].images[j]`` when a picture cannot be read.

Accepted ``input`` entries: a string, or an item dict with ``text``, ``instruction``,
``images`` (or ``image``), ``video`` (frames), ``tcot`` (a given T-CoT) and ``input_type``.
Media are ``data:`` URLs, or paths / ``file://`` URLs under ``--allow-local-files``.
``messages`` (vLLM style, one conversation = one embedding): ``system`` text becomes the
instruction, ``user`` text the text, ``image_url`` parts the images, and our ``video`` part
(``{"type": "video", "video": [frame URL, ...]}``) the video.
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import os
from typing import Any, Mapping
from urllib.parse import unquote, urlparse

from PIL import Image

__all__ = ["APIError", "EmbeddingRequest", "parse_request", "load_item", "error_body", "SIDES"]

TOP_KEYS = {"model", "input", "messages", "encoding_format", "dimensions", "user", "reasoning", "return_tcot",
            "input_type"}
ITEM_KEYS = {"text", "instruction", "images", "image", "video", "tcot", "input_type"}
#: input_type values -> the Reasoner prompt side (the method's query / positive prompts)
SIDES = {"query": "query", "search_query": "query", "document": "positive", "search_document": "positive",
         "passage": "positive", "positive": "positive", "candidate": "positive"}
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "service_unavailable"}


class APIError(Exception):
    """An error answered in the OpenAI shape ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status = int(status)
        self.message = message
        self.param = param
        self.code = code
        self.type = type or ERROR_TYPES.get(self.status, "server_error")

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _bad(message: str, param: str | None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


@dataclasses.dataclass
class EmbeddingRequest:
    items: list[dict]  # raw item dicts (media still as strings), in input order
    params: list[str]  # the request field each item came from, e.g. "input[2]" or "messages"
    sides: list[str]  # "query" / "positive" per item
    model: str | None
    encoding_format: str
    dimensions: int | None
    reasoning: bool
    return_tcot: bool


def _side(value: Any, param: str) -> str:
    if not isinstance(value, str) or value.lower() not in SIDES:
        raise _bad(f"{param} must be one of {sorted(SIDES)} (the side of the pair: query or document), got {value!r}",
                   param)
    return SIDES[value.lower()]


def _bool(body: Mapping, key: str) -> bool:
    v = body.get(key, False)
    if not isinstance(v, bool):
        raise _bad(f"{key} must be true or false, got {v!r}", key)
    return v


def parse_request(body: Any, *, max_inputs: int, default_side: str = "query") -> EmbeddingRequest:
    """Check the request body's structure; media stay unread (see `load_item`)."""
    if not isinstance(body, dict):
        raise _bad(f"the request body must be a JSON object, got {type(body).__name__}", None, "invalid_json")
    unknown = sorted(set(body) - TOP_KEYS)
    if unknown:
        raise _bad(f"unknown field {unknown[0]!r} (accepted: {sorted(TOP_KEYS)})", unknown[0], "unknown_field")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _bad(f"model must be a string, got {model!r}", "model")
    fmt = body.get("encoding_format", "float")
    if fmt is None:
        fmt = "float"
    if fmt not in ("float", "base64"):
        raise _bad(f"encoding_format must be 'float' or 'base64', got {fmt!r}", "encoding_format")
    dims = body.get("dimensions")
    if dims is not None and (isinstance(dims, bool) or not isinstance(dims, int)):
        raise _bad(f"dimensions must be an integer, got {dims!r}", "dimensions")
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise _bad("user must be a string", "user")
    reasoning, return_tcot = _bool(body, "reasoning"), _bool(body, "return_tcot")
    side = _side(body["input_type"], "input_type") if body.get("input_type") is not None else default_side

    has_input, has_messages = body.get("input") is not None, body.get("messages") is not None
    if has_input == has_messages:
        raise _bad("give exactly one of 'input' and 'messages'", "input", "missing_input" if not has_input else
                   "invalid_value")
    if has_messages:
        items, params = [_from_messages(body["messages"])], ["messages"]
    else:
        raw = body["input"]
        if isinstance(raw, (str, dict)):
            raw = [raw]
        if not isinstance(raw, list):
            raise _bad(f"input must be a string, a list of strings or a list of items, got {type(raw).__name__}",
                       "input")
        if not raw:
            raise _bad("input is empty", "input", "empty_input")
        if len(raw) > max_inputs:
            raise APIError(413, f"{len(raw)} inputs in one request; this server takes at most {max_inputs}",
                           param="input", code="too_many_inputs")
        if all(isinstance(x, int) and not isinstance(x, bool) for x in raw) or any(isinstance(x, list) for x in raw):
            raise _bad("token-id input is not supported: send text (the server tokenizes with the model's template)",
                       "input", "unsupported_input")
        items, params = [], []
        for i, x in enumerate(raw):
            param = f"input[{i}]"
            if isinstance(x, str):
                items.append({"text": x})
            elif isinstance(x, dict):
                items.append(_check_item(x, param))
            else:
                raise _bad(f"{param}: expected a string or an item object, got {type(x).__name__}", param)
            params.append(param)
    sides = []
    for item, param in zip(items, params):
        it = item.pop("input_type", None)
        sides.append(_side(it, f"{param}.input_type") if it is not None else side)
        _check_not_empty(item, param)
    return EmbeddingRequest(items, params, sides, model, fmt, dims, reasoning, return_tcot)


def _str_list(value, param: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _bad(f"{param} must be a list of data: URLs or file paths (strings)", param)
    return list(value)


def _check_item(x: dict, param: str) -> dict:
    unknown = sorted(k for k in x if k not in ITEM_KEYS)
    if unknown:
        raise _bad(f"{param}: unknown key {unknown[0]!r} (item keys: {sorted(ITEM_KEYS)})", f"{param}.{unknown[0]}",
                   "unknown_field")
    item = {}
    for key in ("text", "instruction", "tcot"):
        if x.get(key) is not None:
            if not isinstance(x[key], str):
                raise _bad(f"{param}.{key} must be a string, got {type(x[key]).__name__}", f"{param}.{key}")
            item[key] = x[key]
    images = []
    if x.get("image") is not None:
        images += _str_list(x["image"], f"{param}.image")
    if x.get("images") is not None:
        images += _str_list(x["images"], f"{param}.images")
    if images:
        item["images"] = images
    if x.get("video") is not None:
        frames = _str_list(x["video"], f"{param}.video")
        if not frames:
            raise _bad(f"{param}.video has no frames", f"{param}.video")
        item["video"] = frames
    if x.get("input_type") is not None:
        item["input_type"] = x["input_type"]
    return item


def _check_not_empty(item: dict, param: str) -> None:
    text = " ".join(item.get(k, "") for k in ("instruction", "text")).strip()
    if not text and not item.get("images") and not item.get("video"):
        what = "text is empty" if ("text" in item or "instruction" in item) else "item has no text, images or video"
        raise _bad(f"{param}: {what}", f"{param}.text" if "text" in item else param, "empty_input")


def _from_messages(messages) -> dict:
    if not isinstance(messages, list) or not messages:
        raise _bad("messages must be a non-empty list of {role, content} objects", "messages")
    instruction, text, images, video = [], [], [], None
    for i, m in enumerate(messages):
        param = f"messages[{i}]"
        if not isinstance(m, dict) or "content" not in m:
            raise _bad(f"{param} must be an object with 'role' and 'content'", param)
        role = m.get("role", "user")
        if role not in ("system", "user"):
            raise _bad(f"{param}.role {role!r} is not supported (an embedding conversation has system and user "
                       "messages)", f"{param}.role")
        content = m["content"]
        sink = instruction if role == "system" else text
        if isinstance(content, str):
            sink.append(content)
            continue
        if not isinstance(content, list):
            raise _bad(f"{param}.content must be a string or a list of parts", f"{param}.content")
        for j, part in enumerate(content):
            pp = f"{param}.content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                sink.append(part["text"])
            elif kind == "image_url":
                url = part.get("image_url")
                url = url.get("url") if isinstance(url, dict) else url
                if not isinstance(url, str):
                    raise _bad(f"{pp}.image_url must be {{'url': ...}}", f"{pp}.image_url")
                if role == "system":
                    raise _bad(f"{pp}: images go in user messages", pp)
                images.append(url)
            elif kind == "video":
                if video is not None:
                    raise _bad(f"{pp}: one video per conversation", pp)
                video = _str_list(part.get("video"), f"{pp}.video")
                if not video:
                    raise _bad(f"{pp}.video has no frames", f"{pp}.video")
            else:
                raise _bad(f"{pp}: unsupported part {kind!r} (text, image_url, video)", pp, "unsupported_input")
    item = {}
    if instruction:
        item["instruction"] = " ".join(instruction)
    if text:
        item["text"] = " ".join(text)
    if images:
        item["images"] = images
    if video is not None:
        item["video"] = video
    return item


# ---------------------------------------------------------------------------------------- media
def _open_image(data: bytes, param: str) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return im.convert("RGB") if im.mode != "RGB" else im.copy()
    except Image.DecompressionBombError as e:
        raise _bad(f"{param}: image is too large ({e})", param, "invalid_image") from None
    except Exception as e:  # PIL raises several types for undecodable data
        raise _bad(f"{param}: cannot decode the image: {type(e).__name__}: {e}", param, "invalid_image") from None


def load_image(ref: str, param: str, allow_dir: str | None) -> Image.Image:
    """A data: URL, a file:// URL or a path (only under `allow_dir`) -> RGB PIL image."""
    if ref.startswith("data:"):
        head, sep, payload = ref.partition(",")
        if not sep:
            raise _bad(f"{param}: malformed data: URL (no ',')", param, "invalid_image")
        if head.endswith(";base64"):
            try:
                data = base64.b64decode(payload, validate=True)
            except (binascii.Error, ValueError) as e:
                raise _bad(f"{param}: invalid base64 in the data: URL ({e})", param, "invalid_image") from None
        else:
            data = unquote(payload).encode("latin-1", errors="replace")
        return _open_image(data, param)
    scheme = urlparse(ref).scheme.lower()
    if scheme in ("http", "https", "ftp", "s3", "gs"):
        raise _bad(f"{param}: remote URLs are not fetched by this server; send the image as a data: URL", param,
                   "unsupported_input")
    path = unquote(urlparse(ref).path) if scheme == "file" else ref
    if allow_dir is None:
        raise _bad(f"{param}: local file paths are not allowed (start the server with --allow-local-files DIR, or "
                   "send a data: URL)", param, "local_files_not_allowed")
    root = os.path.realpath(allow_dir)
    real = os.path.realpath(os.path.join(root, path))
    if os.path.commonpath([root, real]) != root:
        raise _bad(f"{param}: {ref} is outside the allowed directory", param, "local_files_not_allowed")
    if not os.path.isfile(real):
        raise _bad(f"{param}: no such file {ref}", param, "invalid_image")
    with open(real, "rb") as f:
        return _open_image(f.read(), param)


def load_item(item: Mapping, param: str, allow_dir: str | None) -> dict:
    """The item with its media decoded to PIL images (errors name ``param.images[j]`` / ``.video[k]``)."""
    out = dict(item)
    if item.get("images"):
        out["images"] = [load_image(r, f"{param}.images[{j}]", allow_dir) for j, r in enumerate(item["images"])]
    if item.get("video"):
        out["video"] = [load_image(r, f"{param}.video[{k}]", allow_dir) for k, r in enumerate(item["video"])]
    return out
