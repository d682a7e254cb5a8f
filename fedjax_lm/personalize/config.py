"""Experiment configs: a YAML mapping → frozen dataclasses, with a `smoke:` block of overrides.

Unknown keys are errors (a typo must not silently run the default), and `--smoke` applies the
config's own `smoke:` overrides so every experiment has a few-step version that tests can run.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, TypeVar

from fedjax_lm.grid import check_keys, load_yaml, require_mapping

T = TypeVar("T")


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge: nested mappings merge, everything else is replaced."""
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def build(cls: type[T], values: dict[str, Any], where: str = "config") -> T:
    """Instantiate a (possibly nested) frozen dataclass, rejecting unknown keys by name."""
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    check_keys(values, fields, where)
    kwargs: dict[str, Any] = {}
    for name, value in values.items():
        default = fields[name].default_factory  # type: ignore[misc]
        nested = default() if default is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(nested):
            kwargs[name] = build(type(nested), require_mapping(value, f"{where}.{name}"),
                                 f"{where}.{name}")
        elif isinstance(value, list):
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = value
    return cls(**kwargs)


def load_config(cls: type[T], path: str | Path, *, smoke: bool = False) -> T:
    """`cls` from the YAML at `path` (with its `smoke:` overrides when `smoke`)."""
    raw = load_yaml(path)
    smoke_block = require_mapping(raw.pop("smoke", None), f"{path}: smoke")
    if smoke:
        raw = merge(raw, smoke_block)
    return build(cls, raw, str(path))
