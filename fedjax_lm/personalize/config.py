"""Experiment configs: a YAML mapping → frozen dataclasses, with a `smoke:` block of overrides.

Unknown keys are errors (a typo must not silently run the default), and `--smoke` applies the
config's own `smoke:` overrides so every experiment has a few-step version that tests can run.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Hashable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from fedjax_lm.grid import ConfigError, check_keys, load_yaml, require_mapping

T = TypeVar("T")
SEED_MAX = 2**31 - 1  # seeds become int32 arrays (jnp.asarray of the seed list)


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


# ----------------------------------------------------------------------------- value checks
# The pieces every `check_config` is made of: each raises one ConfigError line naming the field,
# what it takes and what it got, before any data is loaded or any model trained.


def need(ok: bool, msg: str) -> None:
    """A ConfigError with `msg` unless `ok`."""
    if not ok:
        raise ConfigError(msg)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value))


def _got(value: Any) -> str:
    """`value` as the message shows it, with a hint for YAML's text-not-number floats."""
    hint = ""
    if isinstance(value, str):
        try:
            float(value)
            hint = f" (YAML reads {value} as text: write it with a decimal point, e.g. 1.0e-3)"
        except ValueError:
            pass
    return f"{value!r}{hint}"


def check_int(name: str, value: Any, low: int = 1, high: int | None = None, *,
              optional: bool = False) -> None:
    """`value` is a whole number in [low, high] (or None when `optional`)."""
    if optional and value is None:
        return
    span = f">= {low}" if high is None else f"in [{low}, {high}]"
    need(_is_int(value) and value >= low and (high is None or value <= high),
         f"{name} must be a whole number {span}{' (or unset)' if optional else ''}, "
         f"got {_got(value)}")


def check_number(name: str, value: Any, low: float, high: float | None = None, *,
                 low_open: bool = False, high_open: bool = True) -> None:
    """`value` is a finite number in the interval from `low` to `high` (open ends as given);
    without `high`, `> low` (low_open) or `>= low`."""
    ok = _is_number(value) and (value > low if low_open else value >= low)
    if high is None:
        span = f"{'>' if low_open else '>='} {low:g}"
    else:
        ok = ok and (value < high if high_open else value <= high)
        span = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    need(ok, f"{name} must be a finite number {span}, got {_got(value)}")


def check_choice(name: str, value: Any, valid: Iterable[Any]) -> None:
    """`value` is one of `valid` (listed in the message)."""
    valid = tuple(valid)
    need(isinstance(value, Hashable) and value in valid,
         f"{name} must be one of {', '.join(map(str, valid))}, got {value!r}")


def check_bool(name: str, value: Any) -> None:
    need(isinstance(value, bool), f"{name} must be true or false, got {value!r}")


def check_str(name: str, value: Any, *, optional: bool = False) -> None:
    """`value` is a non-empty string (or None when `optional`)."""
    if optional and value is None:
        return
    need(isinstance(value, str) and value.strip() != "",
         f"{name} must be a non-empty string{' (or unset)' if optional else ''}, got {value!r}")


def check_list(name: str, values: Any, item: str) -> None:
    """`values` is a non-empty list (a tuple once built) without repeats; `item` describes an
    entry for the message."""
    need(isinstance(values, tuple) and len(values) > 0,
         f"{name} must be a non-empty list of {item}, got {values!r}")
    repeated = [v for i, v in enumerate(values) if v in values[:i]]
    if repeated:
        raise ConfigError(f"{name} lists {repeated[0]!r} more than once; remove the repeat")


def check_seeds(name: str, seeds: Any, high: int = SEED_MAX) -> None:
    """A non-empty list of distinct whole numbers in [0, high]."""
    check_list(name, seeds, "whole numbers")
    for seed in seeds:
        need(_is_int(seed) and 0 <= seed <= high,
             f"{name} must be whole numbers in [0, {high}], got {seed!r}")
