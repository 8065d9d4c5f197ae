"""TOML configuration into frozen dataclasses, validated at load.

Shared by the agent and the broker. Every error names the file, the key (as a
dotted path) and the reason; unknown keys are errors, so a typo never silently
falls back to a default. Fields whose names end in `_bytes` also accept sizes
with units ("512MiB", "4G").
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*", re.IGNORECASE)
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


class ConfigError(ValueError):
    def __init__(self, file: str | Path, key: str | None, reason: str) -> None:
        where = f"{file}: {key}" if key else str(file)
        super().__init__(f"{where}: {reason}")
        self.file = str(file)
        self.key = key
        self.reason = reason


def parse_size(value: object) -> int:
    """Bytes from an integer or a string with a binary unit: "128MiB", "4G", "1024"."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"size must not be negative, got {value}")
        return value
    if isinstance(value, str) and (m := _SIZE.fullmatch(value)):
        unit = (m.group(2) or "").upper().rstrip("B").rstrip("I")
        size = float(m.group(1)) * _UNITS[unit]
        if not math.isfinite(size):
            raise ValueError(f"size {value!r} is too large")
        return int(size)
    raise ValueError(f"expected a size such as 512MiB or 4GiB, got {value!r}")


def load_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except OSError as err:
        raise ConfigError(path, None, f"cannot read: {err.strerror}") from err
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(path, None, f"not valid TOML: {err}") from err
    except UnicodeDecodeError as err:
        raise ConfigError(path, None, f"not UTF-8 text: {err}") from err


def build(cls: type[T], table: Mapping[str, Any], *, file: str | Path, prefix: str = "") -> T:
    """Build dataclass `cls` from a TOML table, checking every key and value."""
    if not isinstance(table, Mapping):
        raise ConfigError(file, prefix or None, f"expected a table, got {table!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(table) - set(fields))
    if unknown:
        key = _join(prefix, unknown[0])
        raise ConfigError(file, key, f"unknown key (expected one of: {', '.join(sorted(fields))})")
    missing = [
        name
        for name, f in fields.items()
        if name not in table
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(file, _join(prefix, missing[0]), "required")
    values = {}
    for name, raw in table.items():
        key = _join(prefix, name)
        values[name] = _convert(hints[name], raw, name, file=file, key=key)
    try:
        return cls(**values)
    except ValueError as err:
        # __post_init__ checks name their field first ("maximum: ..."), so
        # point at the table's key when the message starts with a field name.
        field, sep, reason = str(err).partition(": ")
        if sep and field in fields:
            raise ConfigError(file, _join(prefix, field), reason) from err
        raise ConfigError(file, prefix or None, str(err)) from err


def _join(prefix: str, name: str) -> str:
    # A name that is not a bare TOML key is shown quoted, as TOML would write it.
    if not _BARE_KEY.fullmatch(name):
        name = json.dumps(name)
    return f"{prefix}.{name}" if prefix else name


def _convert(hint: Any, raw: Any, name: str, *, file: str | Path, key: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(options) == 1:
            return _convert(options[0], raw, name, file=file, key=key)
    if dataclasses.is_dataclass(hint):
        return build(hint, raw, file=file, prefix=key)  # type: ignore[arg-type]
    if origin is tuple:
        (item,) = {a for a in typing.get_args(hint) if a is not Ellipsis}
        if not isinstance(raw, list):
            raise ConfigError(file, key, f"expected a list, got {raw!r}")
        return tuple(
            _convert(item, r, name, file=file, key=f"{key}[{i}]") for i, r in enumerate(raw)
        )
    try:
        if hint is int and name.endswith("_bytes"):
            return parse_size(raw)
        if hint is bool:
            if not isinstance(raw, bool):
                raise ValueError(f"expected true or false, got {raw!r}")
            return raw
        if hint is int:
            if isinstance(raw, bool) or not isinstance(raw, int):
                raise ValueError(f"expected an integer, got {raw!r}")
            return raw
        if hint is float:
            # TOML has nan; no setting means it, and every comparison with it is false.
            if isinstance(raw, bool) or not isinstance(raw, int | float) or math.isnan(raw):
                raise ValueError(f"expected a number, got {raw!r}")
            return float(raw)
        if hint is str:
            if not isinstance(raw, str):
                raise ValueError(f"expected a string, got {raw!r}")
            return raw
        if hint is Path:
            if not isinstance(raw, str) or not raw:
                raise ValueError(f"expected a path, got {raw!r}")
            return Path(raw)
        if isinstance(hint, type) and issubclass(hint, str):  # a StrEnum
            return hint(raw)
    except ValueError as err:
        raise ConfigError(file, key, str(err)) from err
    raise ConfigError(file, key, f"unsupported setting type {hint!r}")
