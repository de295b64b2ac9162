"""Typed, frozen dataclass configs: JSON files or presets in, dotted overrides, dicts out.

    cfg = load_config("toy_embedder", TrainConfig)          # configs/toy_embedder.json
    cfg = apply_overrides(cfg, ["optim.lr=1e-4", "mesh.fsdp=-1", "name=run1"])
    json.dumps(to_dict(cfg))

Every value is checked against the field's annotation; errors name the dotted field.
Supported annotations: bool, int, float, str, None, X | None, Literal[...], tuple[X, ...],
tuple[X, Y], list[X], dict[str, X], Any and nested dataclasses. Lists become tuples where
the field is a tuple, ints become floats where the field is a float.
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from .errors import ConfigError, MissingFileError

T = TypeVar("T")

# presets ship inside the package (embedrl_jax/configs; in a checkout a link to the top-level configs/),
# so an installed package finds them from any working directory
PRESET_DIR = Path(__file__).resolve().parent / "configs"

__all__ = ["load_config", "from_dict", "apply_overrides", "to_dict", "PRESET_DIR", "ConfigError"]


def _type_name(tp) -> str:
    return tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")


def _convert(value, tp, where: str):
    """Check `value` against annotation `tp`, returning it coerced (lists -> tuples, dicts -> dataclasses)."""
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if dataclasses.is_dataclass(value) and isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected an object for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, where)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arg, where)
            except (TypeError, ValueError) as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: {value!r} matches none of {_type_name(tp)}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list for {_type_name(tp)}, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}")
            items = [_convert(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args))]
        else:
            item = args[0] if args else Any
            items = [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected an object, got {value!r}")
        kt, vt = args or (Any, Any)
        return {_convert(k, kt, where): _convert(v, vt, f"{where}.{k}") for k, v in value.items()}
    if tp is type(None) or tp is None:
        if value is not None:
            raise ConfigError(f"{where}: expected null, got {value!r}")
        return None
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{where}: expected {tp.__name__}, got bool {value!r}")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def from_dict(cls: type[T], data: dict, where: str = "", base: T | None = None) -> T:
    """Build `cls` from a (nested) dict; fields absent from `data` keep `base`'s or the defaults."""
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        names = ", ".join(f"{where}.{k}" if where else k for k in unknown)
        raise ConfigError(f"unknown config field(s) {names}; {cls.__name__} has {sorted(fields)}")
    kw = {}
    for name, value in data.items():
        sub = f"{where}.{name}" if where else name
        tp = hints[name]
        current = getattr(base, name) if base is not None else None
        if isinstance(value, dict) and dataclasses.is_dataclass(tp) and dataclasses.is_dataclass(current):
            kw[name] = from_dict(type(current), value, sub, base=current)
        else:
            kw[name] = _convert(value, tp, sub)
    try:
        return dataclasses.replace(base, **kw) if base is not None else cls(**kw)
    except TypeError as e:  # a required field was not given
        raise ConfigError(f"{where or cls.__name__}: {e}") from None


def load_config(path_or_preset: str | Path | dict | None, cls: type[T], preset_dir: Path | None = None) -> T:
    """A JSON file, a preset name (`<preset_dir>/<name>.json`, also written `configs/<name>.json`), a
    dict, or None for the defaults."""
    if path_or_preset is None:
        return cls()
    if isinstance(path_or_preset, dict):
        return from_dict(cls, path_or_preset)
    path = Path(path_or_preset)
    if not path.is_file():
        root = Path(preset_dir) if preset_dir is not None else PRESET_DIR
        # "configs/<name>.json" (the checkout's layout) names the shipped preset from any directory
        rel = Path(*path.parts[1:]) if len(path.parts) > 1 and path.parts[0] == "configs" else path
        preset = root / (rel if rel.suffix == ".json" else Path(f"{rel}.json"))
        if path.is_absolute() or not preset.is_file():
            known = sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.json")) if root.is_dir() else []
            raise MissingFileError(f"no config file or preset {str(path_or_preset)!r} (presets in {root}: {known})")
        path = preset
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: invalid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object at top level")
    try:
        return from_dict(cls, data)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{path}: {e}") from None


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _set(cfg, keys: list[str], raw: str, dotted: str):
    name = keys[0]
    fields = {f.name for f in dataclasses.fields(cfg) if f.init}
    if name not in fields:
        raise ConfigError(f"unknown config key {dotted!r}: {type(cfg).__name__} has no field {name!r} (fields: {sorted(fields)})")
    current = getattr(cfg, name)
    if len(keys) > 1:
        if not dataclasses.is_dataclass(current):
            raise ConfigError(f"unknown config key {dotted!r}: {name!r} is not a nested config")
        return dataclasses.replace(cfg, **{name: _set(current, keys[1:], raw, dotted)})
    tp = _hints(type(cfg))[name]
    value = _parse_value(raw)
    if dataclasses.is_dataclass(current) and isinstance(value, dict):
        new = from_dict(type(current), value, dotted, base=current)
    else:
        try:
            new = _convert(value, tp, dotted)
        except (TypeError, ValueError) as e:
            if isinstance(value, str):
                raise
            try:  # e.g. name=123 for a str field keeps the text
                new = _convert(raw, tp, dotted)
            except (TypeError, ValueError):
                raise e from None
    return dataclasses.replace(cfg, **{name: new})


def apply_overrides(cfg: T, overrides: typing.Iterable[str]) -> T:
    """Return a new config with `key.sub=value` overrides applied (values parsed as JSON, else text)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        try:
            cfg = _set(cfg, key.split("."), raw, key)
        except TypeError as e:
            raise ConfigError(f"override {item!r}: {e}") from None
    return cfg


def to_dict(cfg) -> dict[str, Any]:
    """JSON-ready nested dict (tuples as lists)."""

    def plain(x):
        if dataclasses.is_dataclass(x) and not isinstance(x, type):
            return {f.name: plain(getattr(x, f.name)) for f in dataclasses.fields(x)}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        return x

    return plain(cfg)
