"""Typed dataclasses from YAML: a file read with `yaml.safe_load`, dotted `key.sub=value`
overrides, and every value checked against its field's type (nested dataclasses, lists,
Optional, Literal, bool/int/float/str) as the dataclass is built. Each problem is one
`ConfigError` line naming the key; an unknown key gets the nearest known one as a hint.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A recipe or override that cannot be used; the message is one line naming the key."""

    exit_code = 2  # the command's status, under mpirun too (distributed aborts the job with it)

    def renamed(self, names: dict[str, str]) -> "ConfigError":
        """This error as a command without recipes must say it: each recipe key in `names` replaced
        by that command's own name for it (`parallel.tensor_model_parallel_size` -> `--tp`)."""
        message = str(self)
        for key, name in names.items():
            message = message.replace(key, name)
        return ConfigError(message)


def first_line(exc: BaseException) -> str:
    """What a one-line error quotes of a library's exception: its message's first line, or its
    type's name when the message is empty."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"recipe {path} does not exist: pass the path of a YAML recipe")
    try:
        raw = yaml.safe_load(path.read_text())
    except (UnicodeDecodeError, OSError) as exc:
        raise ConfigError(f"recipe {path} cannot be read as text ({type(exc).__name__}): pass a YAML recipe") from None
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        where = f" line {line + 1}" if line is not None else ""
        raise ConfigError(f"recipe {path}{where} is not valid YAML: fix its syntax") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"recipe {path} must be a mapping of sections (model:, train:, ...)")
    return raw


def apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r} is not key=value: write e.g. train.lr=1e-4")
    try:
        value = yaml.safe_load(text) if text else ""
    except yaml.YAMLError:
        value = text
    if isinstance(value, int) and not isinstance(value, bool) and str(value) != text.strip():
        value = text.strip()  # YAML 1.1 reads 0123 as octal, 0x1F as hex: a path or name keeps its text
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        if node.get(part) is None:  # absent, or an empty section in the YAML
            node[part] = {}
        child = node[part]
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {part} is a value, not a section")
        node = child
    node[parts[-1]] = value


def build(cls: type, raw: Any, prefix: str) -> Any:
    if raw is None and prefix:  # a section whose keys are all commented out
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'recipe'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else f" (known: {', '.join(names)})"
            raise ConfigError(f"unknown key {prefix}{key}{hint}")
    kwargs = {name: _coerce(hints[name], raw[name], f"{prefix}{name}") for name in names if name in raw}
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key + ".")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(map(str, args))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    return _coerce_scalar(tp, value, key)


def _coerce_scalar(tp: type, value: Any, key: str) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and re.fullmatch(r"[+-]?\d+(_\d+)*", value.strip()):  # 0123, 1_000 as decimals
            return int(value.replace("_", ""))
    elif tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None and math.isfinite(number):
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int) and not isinstance(value, bool):  # YAML reads `- 8192` as a number
            return str(value)
    raise ConfigError(f"{key} must be {tp.__name__}, got {value!r}")
