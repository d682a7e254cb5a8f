"""YAML presets and command-line overrides: a preset's base values, its sweep grid and how the
sweep may vectorize, each checked before anything runs (the values by `checks.from_dict`)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import yaml

from fedjax_lm.grid import ConfigError, check_keys, expand_grid, load_yaml, require_mapping
from fedjax_lm.runner.checks import from_dict
from fedjax_lm.runner.config import FIELDS


@dataclasses.dataclass(frozen=True)
class VectorizeOptions:
    """How a sweep's cells share one program (`sweep --vectorize`, or a preset's top-level
    `vectorize: true` / `vectorize: {padding: 1.5, memory: 4GiB}`; runner/vectorized.py)."""

    enabled: bool = False
    # Most padded client-steps a shared program may compute per real one: cells of different
    # client counts or local steps join a program only while the padding stays under this.
    padding: float = 1.5
    memory: int | None = None  # bytes a program may take (None: 90% of the device's, or half
    # the host's available RAM on a CPU)

    def replace(self, **changes: Any) -> VectorizeOptions:
        return vectorize_options({**dataclasses.asdict(self), **changes}, "vectorize")


def vectorize_options(raw: Any, where: str) -> VectorizeOptions:
    """`true` / `false`, or a mapping of `enabled`, `padding` (>= 1), `memory` ("4GiB")."""
    if isinstance(raw, bool) or raw is None:
        return VectorizeOptions(enabled=bool(raw))
    values = require_mapping(raw, where)
    check_keys(values, ("enabled", "padding", "memory"), where)
    try:
        padding = float(values.get("padding", VectorizeOptions.padding))
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: padding must be a number >= 1, got "
                          f"{values['padding']!r}") from None
    if not (math.isfinite(padding) and padding >= 1):
        raise ConfigError(f"{where}: padding must be a number >= 1, got {values['padding']!r}")
    memory = values.get("memory")
    if memory is not None and not isinstance(memory, int):
        from fedjax_lm.scale.memory import parse_bytes

        try:
            memory = parse_bytes(str(memory))
        except ValueError as e:
            raise ConfigError(f"{where}: memory: {e}") from None
    if memory is not None and memory <= 0:
        raise ConfigError(f"{where}: memory must be > 0 bytes, got {values['memory']!r}")
    return VectorizeOptions(enabled=bool(values.get("enabled", True)), padding=padding,
                            memory=memory)


@dataclasses.dataclass(frozen=True)
class Preset:
    """A YAML preset: base config values, an optional sweep grid (field → values) and how the
    sweep may vectorize its cells."""

    name: str
    base: dict[str, Any]
    grid: dict[str, list[Any]]
    vectorize: VectorizeOptions = VectorizeOptions()


def load_preset(path: str | Path) -> Preset:
    """A preset file (`name`, `base`, `sweep`, `vectorize`), checked whole before anything
    runs."""
    raw = load_yaml(path, keys=("name", "base", "sweep", "vectorize"))
    base = require_mapping(raw.get("base"), f"{path}: base")
    grid = require_mapping(raw.get("sweep"), f"{path}: sweep")
    check_keys(grid, FIELDS, f"{path}: sweep")
    expand_grid(grid, where=f"{path}: sweep")  # every axis a non-empty list
    try:
        from_dict(base)  # fail early on a bad base
    except ConfigError as e:
        raise ConfigError(f"{path}: base: {e}") from None
    return Preset(name=raw.get("name", Path(path).stem), base=dict(base), grid=dict(grid),
                  vectorize=vectorize_options(raw.get("vectorize"), f"{path}: vectorize"))


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`["clients=8", "lr=1e-4"]` → a dict with YAML-parsed values."""
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"override {pair!r} must look like field=value")
        key, value = pair.split("=", 1)
        key = key.strip().replace("-", "_")
        if key not in FIELDS:
            raise ConfigError(f"unknown config field {key!r} in override {pair!r}")
        try:
            out[key] = yaml.safe_load(value) if value else None
        except yaml.YAMLError:
            raise ConfigError(f"override {pair!r}: {value!r} is not a valid YAML value "
                              "(quote it, or write lists as [a, b])") from None
    return out
