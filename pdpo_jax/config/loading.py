"""Reading a run config: YAML files are data, the dataclasses of `schema` are the schema.

`load_config(path, overrides)` reads a YAML file, applies `a.b.c=value` overrides, and builds
the dataclasses, refusing unknown keys (with the nearest known key), wrong types and values
outside a field's `Range`.
"""
from __future__ import annotations

import dataclasses
import difflib
import pathlib
import types
import typing
from typing import Annotated, Any, Literal

import yaml

from pdpo_jax.config.schema import Config, Range
from pdpo_jax.errors import UserError


class ConfigError(UserError):
    """A config file or override that does not fit the schema."""


def _suggest(key: str, known) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return f"; did you mean {close[0]!r}?" if close else f"; known keys: {sorted(known)}"


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Annotated:
        base, *constraints = typing.get_args(tp)
        value = _coerce(value, base, where)
        for c in constraints:
            if isinstance(c, Range) and not c.contains(value):
                raise ConfigError(f"{where}: {value!r} is out of range; allowed: {c}")
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _coerce(value, option, where)
            except ConfigError as e:
                errors.append((_is_list_type(option) == isinstance(value, (list, tuple)), str(e)))
        # the error of the option the value is shaped like (a list for `tuple[...]`), if any
        raise ConfigError(max(errors, key=lambda e: e[0])[1])
    if origin is Literal:
        if value not in typing.get_args(tp):
            allowed = list(typing.get_args(tp))
            close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{where}: {value!r} is not one of {allowed}{hint}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return build(tp, value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item = typing.get_args(tp)[0]
        return tuple(_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if tp is float and isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads `1e-5` as a string
        except ValueError:
            pass
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is dict and isinstance(value, dict):
        return value
    if isinstance(tp, type) and isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{where}: expected {getattr(tp, '__name__', tp)}, got {value!r}")


def _is_list_type(tp: Any) -> bool:
    return typing.get_origin(_plain(tp)) is tuple


def _plain(tp: Any) -> Any:
    """The type under an Annotated[...] wrapper."""
    return typing.get_args(tp)[0] if typing.get_origin(tp) is Annotated else tp


def build(cls, raw: dict, where: str = ""):
    """Builds dataclass `cls` from a mapping, checking every key and type; a ValueError from
    the dataclass's own checks (`__post_init__`, message "<field>: ...") names its key."""
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        path = f"{where}.{key}" if where else key
        if key not in fields:
            raise ConfigError(f"unknown config key {path!r}{_suggest(key, fields)}")
        default = getattr(cls(), key) if dataclasses.is_dataclass(_plain(hints[key])) else None
        if dataclasses.is_dataclass(default) and isinstance(value, dict):
            # Nested sections overlay their defaults (e.g. dpo.optimizer keeps lr=1e-6).
            value = _deep_merge(dataclasses.asdict(default), value)
        kwargs[key] = _coerce(value, hints[key], path)
    try:
        return cls(**kwargs)
    except ValueError as e:  # a section's cross-field check: "<field>: what is wrong"
        raise ConfigError(f"{where}.{e}" if where else str(e)) from None


def _deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            value = _deep_merge(out[key], value)
        out[key] = value
    return out


def set_dotted(raw: dict, item: str, prefix: str = "") -> None:
    """Applies one `a.b.c=value` override (value parsed as YAML) to the mapping `raw`; a
    leading `prefix` on the key is optional."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like {prefix or 'section.'}key=value")
    dotted, value = item.split("=", 1)
    *parents, leaf = dotted.strip().removeprefix(prefix).split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {part!r} is not a section")
    node[leaf] = yaml.safe_load(value)


def _read_yaml(path: pathlib.Path, seen: tuple[pathlib.Path, ...] = ()) -> dict:
    """A YAML mapping; a top-level `base: other.yaml` (relative to this file) is read first and
    this file's keys overlay it, so experiment configs share one set of defaults, not copies."""
    path = path.resolve()
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    if path in seen:
        raise ConfigError(f"{path}: `base` chain loops back to itself")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    base = raw.pop("base", None)
    if base is None:
        return raw
    return _deep_merge(_read_yaml(path.parent / base, (*seen, path)), raw)


def load_config(path: str | pathlib.Path | None, overrides: tuple[str, ...] = ()) -> Config:
    """Config from a YAML file plus `a.b=value` overrides (values parsed as YAML)."""
    raw: dict = {}
    if path is not None:
        raw = _read_yaml(pathlib.Path(path))
    for item in overrides:
        set_dotted(raw, item)
    try:
        return build(Config, raw)
    except ConfigError as e:
        raise ConfigError(f"{path or '<overrides>'}: {e}") from None


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
