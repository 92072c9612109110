"""Layered, typed configuration shared by every Stanchion process.

One loader for every daemon and the trainer: defaults (the dataclass) < TOML file < ``STANCHION_*``
environment < explicit overrides (CLI flags or ``--set key=value``). The result is a frozen
dataclass; a bad key or value raises :class:`ConfigError` naming the key and what was expected.

This module is pure standard library on purpose: the agent, coordinator and CLI import it without
paying for torch.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

T = TypeVar("T")

ENV_PREFIX = "STANCHION_"


class ConfigError(ValueError):
    """A configuration key or value is wrong. The message names the key."""


def read_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None


def parse_assignments(items: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Turn ``["model.n_layer=4", "seed=1"]`` into a nested dict; values are parsed as TOML
    scalars when they can be (``4``, ``true``, ``"x"``, ``[1, 2]``) and kept as strings otherwise."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        _set_dotted(out, key, parse_scalar(raw.strip()))
    return out


def parse_scalar(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def env_overrides(cls: type, env: Mapping[str, str], prefix: str = ENV_PREFIX) -> dict[str, Any]:
    """Collect ``PREFIX_SECTION__KEY`` (nested) or ``PREFIX_KEY`` variables that name fields of ``cls``.

    Only variables matching a field are read, so unrelated ``STANCHION_*`` variables (for example the
    trainer contract's) never cause errors here.
    """
    out: dict[str, Any] = {}
    for dotted in _field_paths(cls):
        name = prefix + dotted.replace(".", "__").upper()
        if name in env:
            _set_dotted(out, dotted, parse_scalar(env[name]))
    return out


def merge(*layers: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge dicts; later layers win."""
    out: dict[str, Any] = {}
    for layer in layers:
        for k, v in layer.items():
            if isinstance(v, Mapping) and isinstance(out.get(k), dict):
                out[k] = merge(out[k], v)
            elif isinstance(v, Mapping):
                out[k] = merge(v)
            else:
                out[k] = v
    return out


def load(
    cls: type[T],
    *,
    base: Mapping[str, Any] | None = None,
    toml_path: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    env_prefix: str = ENV_PREFIX,
) -> T:
    """Build ``cls`` from defaults < base < TOML < environment < overrides."""
    layers: list[Mapping[str, Any]] = []
    if base:
        layers.append(base)
    if toml_path is not None:
        layers.append(read_toml(toml_path))
    if env is not None:
        layers.append(env_overrides(cls, env, env_prefix))
    if overrides:
        layers.append(overrides)
    return build(cls, merge(*layers))


def build(cls: type[T], data: Mapping[str, Any], *, path: str = "") -> T:
    """Validate a nested mapping into the frozen dataclass ``cls``."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path or 'config'}: expected a table, got {type(data).__name__}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f" in [{path}]" if path else ""
        raise ConfigError(
            f"unknown key {_join(path, unknown[0])!r}{where}; expected one of: {', '.join(sorted(fields))}"
        )
    kwargs = {name: coerce(hints[name], data[name], _join(path, name)) for name in data}
    try:
        obj = cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{path or 'config'}: {e}") from None
    return obj


def coerce(tp: Any, value: Any, key: str) -> Any:
    """Check (and gently convert: int -> float, list -> tuple) ``value`` against the annotation ``tp``."""
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if dataclasses.is_dataclass(value):
            return value
        return build(tp, value, path=key)
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(arg, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: {value!r} does not match {_describe(tp)}")
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = get_args(tp)
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return tuple(coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
        if origin is tuple and args:
            if len(args) != len(value):
                raise ConfigError(f"{key}: expected {len(args)} items, got {len(value)}")
            return tuple(
                coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True))
            )
        inner = args[0] if args else Any
        return tuple(coerce(inner, v, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a table, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        raise ConfigError(f"{key}: expected a path, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {tp!r}")  # a programming error in a config class


def as_dict(obj: Any) -> dict[str, Any]:
    """A dataclass as plain JSON/TOML-friendly data (tuples become lists, paths strings)."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, Path):
            return str(v)
        return v

    return plain(obj)


def option(default: Any, help: str) -> Any:
    """A configuration field that is also a command-line option: ``help`` is the flag's help text.
    The flag (``--name``), environment variable and TOML key come from the field's name."""
    return dataclasses.field(default=default, metadata={"help": help})


def require(condition: bool, key: str, message: str) -> None:
    """Raise a ConfigError naming ``key`` unless ``condition`` holds (for ``__post_init__`` checks)."""
    if not condition:
        raise ConfigError(f"{key}: {message}")


def _field_paths(cls: type, prefix: str = "") -> list[str]:
    hints = get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out.extend(_field_paths(tp, _join(prefix, f.name)))
        else:
            out.append(_join(prefix, f.name))
    return out


def _set_dotted(d: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        node = d.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: {p!r} is a value, not a table")
        d = node
    d[leaf] = value


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _describe(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")
