"""Dataclass configs: defaults with help text, loaded from YAML, overridden by ``key=value``.

Every job has one config dataclass (nested dataclasses for its sections). The rules, shared by
all of them:

* ``field(default, help="...")`` gives every option a default and a help text;
* :func:`load_config` reads a YAML file, applies ``a.b=value`` overrides (values parsed as YAML,
  so ``epochs=3``, ``delta.bits=4``, ``routing.mode=soft`` and ``data.classes=[a,b]`` all work);
* unknown keys are an error that names the key and the keys that exist;
* :func:`to_dict` / :func:`save_config` give the resolved config that is saved with the outputs.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from supersub import atomic

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that does not fit the config dataclass."""


def field(default: Any = dataclasses.MISSING, *, help: str, default_factory: Any = dataclasses.MISSING):
    """A dataclass field with a help text (shown by ``--help-config``)."""
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata={"help": help})
    if dataclasses.is_dataclass(default):  # nested section: a fresh copy per instance
        return dataclasses.field(default_factory=lambda: dataclasses.replace(default), metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _coerce(value: Any, tp: Any, key: str, base: Any = None) -> Any:
    """Checks and converts one YAML value to the annotated type (ints to floats, lists to tuples).
    ``base``: for a section, the instance a partial mapping updates."""
    tp, optional = _unwrap_optional(tp)
    if value is None:
        if optional or tp is Any:
            return None
        raise ConfigError(f"{key}: null is not allowed (expected {getattr(tp, '__name__', tp)})")
    if dataclasses.is_dataclass(tp):
        if dataclasses.is_dataclass(value):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for section {tp.__name__}, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.", base=base)
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool) and {"on", "off"} <= set(choices):
            value = "on" if value else "off"  # YAML 1.1 reads a bare on/off as a boolean
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {list(choices)}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    return value


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "", base: T | None = None) -> T:
    """Builds ``cls`` from a (nested) mapping; unknown keys raise :class:`ConfigError`.

    Keys the mapping leaves out keep their values in ``base`` (default: ``cls()``), section by
    section: ``specialist: {optim: {epochs: 2}}`` changes the specialist's epochs and keeps the
    specialist's own learning rate, not OptimConfig's class default."""
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), names, n=1)
        hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
        raise ConfigError(f"unknown config key {prefix}{key}{hint}; known keys: {', '.join(names)}")
    try:
        base = base if base is not None else cls()
    except (TypeError, ValueError):
        base = None  # a class with required fields: only what the mapping gives
    kwargs = {k: _coerce(v, hints[k], prefix + k, getattr(base, k, None)) for k, v in data.items()}
    try:
        return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {e}") from e


def to_dict(cfg: Any) -> dict[str, Any]:
    """The resolved config as plain YAML-able data (tuples become lists)."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(cfg)


def _set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted}: {p} is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``["a.b=3", "c=[x, y]"]`` → ``{"a": {"b": 3}, "c": ["x", "y"]}`` (values parsed as YAML)."""
    data: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        key = key.strip().lstrip("-")
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({e})") from e
        _set_path(data, key, value)
    return data


def dotted_keys(data: dict[str, Any], prefix: str = "", *, lists: bool = False) -> dict[str, Any]:
    """``{"a": {"b": 3}, "c": [1]}`` → ``{"a.b": 3, "c": [1]}``: the inverse of :func:`parse_overrides`.
    ``lists=True`` also flattens lists of mappings or lists (``{"s": [{"x": 1}]}`` → ``{"s.0.x": 1}``),
    as tracking needs."""
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(dotted_keys(v, key + ".", lists=lists))
        elif lists and isinstance(v, (list, tuple)) and v and all(isinstance(x, (dict, list, tuple)) for x in v):
            items = {str(i): x for i, x in enumerate(v)}
            out.update(dotted_keys(items, key + ".", lists=lists))
        else:
            out[key] = v
    return out


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Deep merge of two mappings; ``update`` wins."""
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> T:
    """Defaults of ``cls`` ← YAML file at ``path`` ← ``key=value`` overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
        data = loaded
    data = merge(data, parse_overrides(list(overrides)))
    return from_dict(cls, data)


def save_config(cfg: Any, path: str | Path) -> None:
    atomic.write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def describe(cls: type, prefix: str = "") -> list[tuple[str, Any, str]]:
    """``(key, default, help)`` for every option, nested sections flattened (for ``--help-config``)."""
    rows: list[tuple[str, Any, str]] = []
    instance = cls()
    for f in dataclasses.fields(cls):
        value = getattr(instance, f.name)
        if dataclasses.is_dataclass(value):
            rows.extend(describe(type(value), prefix + f.name + "."))
        else:
            rows.append((prefix + f.name, to_dict(value), f.metadata.get("help", "")))
    return rows
