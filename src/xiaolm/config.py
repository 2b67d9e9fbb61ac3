"""Typed stage configs: dataclass defaults, a YAML file and `key=value` overrides; resolved config saved."""

from __future__ import annotations

import dataclasses
import os
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from xiaolm.errors import XiaolmError

T = TypeVar("T")


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, typ: Any, key: str) -> Any:
    """Convert a YAML/CLI value to the field's declared type, or raise naming the key."""
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is typing.Literal:
        if isinstance(value, bool):  # YAML reads `compile: true` as a boolean
            value = str(value).lower()
        if value not in args:
            raise XiaolmError(f"bad value {value!r} for '{key}'", where=key,
                              hint=f"use one of {', '.join(str(a) for a in args)}")
        return value
    if dataclasses.is_dataclass(typ):
        if not isinstance(value, dict):
            raise XiaolmError(f"expected a mapping for '{key}', got {value!r}", hint="check the config file")
        if hasattr(typ, "config_variant"):  # e.g. model.arch picks the architecture's config class
            typ = typ.config_variant(value)
        return _build(typ, value, prefix=f"{key}.")
    try:
        if typ is bool:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if typ in (int, float, str):
            if typ is int and isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            if typ is int and isinstance(value, str):
                return int(float(value)) if "e" in value.lower() else int(value)
            return typ(value)
        if origin in (list, tuple):
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            elif not isinstance(value, (list, tuple)):
                value = [value]
            elem = args[0] if args else Any
            return [_coerce(v, elem, f"{key}[{i}]") for i, v in enumerate(value)] if elem is not Any else list(value)
    except (TypeError, ValueError):
        raise XiaolmError(f"bad value {value!r} for '{key}' (expected {getattr(typ, '__name__', typ)})",
                          hint="fix the value in the config file or override") from None
    return value


def _build(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    types = _field_types(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in types:
            known = ", ".join(sorted(types))
            raise XiaolmError(f"unknown config key '{prefix}{key}'", hint=f"known keys: {known}")
        kwargs[key] = _coerce(value, types[key], prefix + key)
    return cls(**kwargs)


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """Turn ['a=1', 'model.dim=64'] into a nested dict with YAML-typed values."""
    tree: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise XiaolmError(f"override '{pair}' is not key=value", hint="write e.g. max_steps=100")
        key, raw = pair.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else ""
        node = tree
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return tree


def merge_tree(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        old = out.get(k)
        # another `arch` means another config class: the old architecture's settings do not carry over
        same_kind = isinstance(old, dict) and v.get("arch", old.get("arch")) == old.get("arch") \
            if isinstance(v, dict) else False
        out[k] = merge_tree(old, v) if same_kind else v
    return out


def load_config(cls: type[T], path: str | os.PathLike | None = None, overrides: list[str] | None = None,
                base: dict[str, Any] | None = None) -> T:
    """Build `cls` from defaults, then `base`, then a YAML file, then `key=value` overrides."""
    data: dict[str, Any] = merge_tree(config_to_dict(cls()), base or {})
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise XiaolmError("config file not found", where=str(p), hint="pass an existing YAML file to --config")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise XiaolmError(f"invalid YAML ({e.__class__.__name__})", where=str(p)) from None
        if not isinstance(loaded, dict):
            raise XiaolmError("config must be a mapping of keys to values", where=str(p))
        data = merge_tree(data, loaded)
    data = merge_tree(data, parse_overrides(overrides or []))
    return _build(cls, data)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Dataclass → plain dict suitable for YAML."""
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML, atomically."""
    from xiaolm.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(config_to_dict(cfg), allow_unicode=True, sort_keys=False))
