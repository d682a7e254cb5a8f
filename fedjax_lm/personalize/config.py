"""Experiment configs: a YAML mapping → frozen dataclasses, with a `smoke:` block of overrides.

Unknown keys are errors (a typo must not silently run the default), and `--smoke` applies the
config's own `smoke:` overrides so every experiment has a few-step version that tests can run.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, TypeVar

import yaml

from fedjax_lm.runner.config import ConfigError

T = TypeVar("T")


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return raw


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
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid: {sorted(fields)}")
    kwargs: dict[str, Any] = {}
    for name, value in values.items():
        default = fields[name].default_factory  # type: ignore[misc]
        nested = default() if default is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(nested) and isinstance(value, dict):
            kwargs[name] = build(type(nested), value, f"{where}.{name}")
        elif isinstance(value, list):
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = value
    return cls(**kwargs)


def load_config(cls: type[T], path: str | Path, *, smoke: bool = False) -> T:
    """`cls` from the YAML at `path` (with its `smoke:` overrides when `smoke`)."""
    raw = read_yaml(path)
    smoke_block = raw.pop("smoke", {}) or {}
    if smoke:
        raw = merge(raw, smoke_block)
    return build(cls, raw, str(path))
