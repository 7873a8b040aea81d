"""Trainer configs: typed frozen dataclasses read from JSON, overridden by `--set key=value`, checked once.

A nested field (a dataclass such as `model` or `data`) starts from the trainer's default for it and takes
the keys given, so a JSON file states only what differs. Values in `--set` are parsed as JSON where
they can be (`lr=3e-4`, `model.ch_mult=[1,2,2]`, `data.path=null`) and taken as strings otherwise.
"""

from __future__ import annotations

import dataclasses
import json
import math
import reprlib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from ldm_rt.runtime.files import FileFormatError, read_json_object

T = TypeVar("T")

# Typo guards, checked before anything is built or allocated: far beyond what these trainers are run with, so
# a larger value is a mistake that would otherwise spend minutes and gigabytes (building the batch sample by
# sample, looping for ever) before failing.
MAX_BATCH_SIZE = 1024  # per process; SD-size models fit a few dozen per device
MAX_STEPS = 10**9  # years of training on any device
MAX_SEED = 2**63 - 1  # torch.manual_seed's range; numpy's SeedSequence takes no negative seed


class TrainConfigError(FileFormatError):
    """A training config is wrong; the message names the key and what to do."""


def check_range(config: Any, low: float, high: float, *names: str) -> None:
    """Each named field of `config` within [low, high], else a TrainConfigError naming it."""
    for name in names:
        value = getattr(config, name)
        if not low <= value <= high:
            bounds = f">= {low}" if high == math.inf else f"between {low} and {high}"
            raise TrainConfigError(f"{name} must be {bounds}, got {value}")


def check_finite_fields(config: Any) -> None:
    """Every float of `config` (and of its tuples) finite: NaN passes every comparison check silently."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        for v in value if isinstance(value, tuple) else (value,):
            if isinstance(v, float) and not math.isfinite(v):
                raise TrainConfigError(f"{f.name} must be a finite number, got {v}")


def parse_override(item: str) -> tuple[list[str], Any]:
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise TrainConfigError(f"--set {item!r}: write key=value, e.g. --set lr=1e-4 or --set model.ch=64")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip().split("."), value


def read_json(path: str | Path) -> dict[str, Any]:
    """The JSON object in a --config file, read bounded through the runtime's one reader (runtime/files.py)."""
    return read_json_object(path, error=TrainConfigError, fix="pass an existing JSON object file as --config", what="training config")


def load_config(cls: type[T], data: dict[str, Any], overrides: list[str] = ()) -> T:
    """Build `cls` from a JSON dict plus `key=value` overrides; any problem is one TrainConfigError."""
    data = json.loads(json.dumps(data))  # deep copy
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise TrainConfigError(f"--set {item!r}: {part!r} is not a section")
            node = child
        node[path[-1]] = value
    return build(cls, data, prefix="")


def build(cls: type[T], data: dict[str, Any], prefix: str, default: Any = None) -> T:
    if not isinstance(data, dict):
        raise TrainConfigError(f"{prefix.rstrip('.') or 'config'} must be an object, got {reprlib.repr(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise TrainConfigError(f"unknown config key {prefix}{unknown[0]}; known keys: {', '.join(sorted(fields))}")
    hints = typing.get_type_hints(cls)
    if default is None:
        default = cls()  # type: ignore[call-arg]
    values = {}
    for name, value in data.items():
        tp = hints[name]
        current = getattr(default, name)
        if dataclasses.is_dataclass(tp):
            values[name] = build(tp, value, f"{prefix}{name}.", default=current)
        elif typing.get_origin(tp) is dict and isinstance(value, dict) and isinstance(current, dict):
            values[name] = {**current, **value}  # a free-form section (e.g. a scheduler config) also merges
        else:
            values[name] = check_value(f"{prefix}{name}", value, tp)
    try:
        return dataclasses.replace(default, **values)
    except ValueError as e:  # a __post_init__ check (ours or a reference ConfigError) already says what to fix
        raise TrainConfigError(str(e)) from None


def check_value(name: str, value: Any, tp: Any) -> Any:
    """Check a JSON value against a field type (int, float, str, bool, None unions, tuples) and return it
    in that type (lists become tuples, ints become floats)."""
    if isinstance(value, float) and not math.isfinite(value):  # JSON NaN / Infinity: no setting means that
        raise TrainConfigError(f"{name}: {value} is not a finite number; give a finite value")
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return check_value(name, value, option)
            except TrainConfigError:
                continue
        raise TrainConfigError(f"{name}: {reprlib.repr(value)} is not a {_type_name(tp)}")
    if tp is type(None):
        if value is None:
            return None
    elif origin is tuple:
        args = typing.get_args(tp)
        if isinstance(value, (list, tuple)):
            item_types = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else list(args)
            if len(item_types) == len(value):
                return tuple(check_value(f"{name}[{i}]", v, t) for i, (v, t) in enumerate(zip(value, item_types)))
    elif origin is dict:
        if isinstance(value, dict):
            return value
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is Any:
        return value
    raise TrainConfigError(f"{name}: {reprlib.repr(value)} is not a {_type_name(tp)}")


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(t) for t in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if typing.get_origin(tp) is tuple:
        return "list"
    return getattr(tp, "__name__", str(tp))


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)
