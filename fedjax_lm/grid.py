"""Config files, grids of cells and resuming a grid: one implementation for every driver
(`runner` sweeps, `personalize` experiments).

A bad config file is one `ConfigError` line, worded the same whichever command read it (the CLI
prints it and exits 2). A grid is every combination of its axes in one fixed order, so a rerun
meets its cells in the order the first run did. A rerun reuses finished cells only when they
were made under the current config, up to the grid axes and the fields marked with
`execution_field` (where, how or under what name a cell runs, never what it computes):
numbers from two setups must not end up in one table.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from fedjax_lm.io import read_jsonl, yaml_problem

CELLS = "cells.jsonl"  # one finished cell per line, appended as cells finish
META = "meta.json"  # {"config": ...}: the config the cells were made under (among other things)
CELL_ENV = "FEDJAX_LM_SWEEP_CELL"  # set for a cell's own process: its errors name the cell
_EXECUTION = "execution"  # the field-metadata key `execution_field` sets


class ConfigError(ValueError):
    """A config that cannot run: bad file, unknown key, wrong type or impossible value."""


class ResumeError(ConfigError):
    """An output folder holds results made under a different config."""


def execution_field(default: Any, **kwargs: Any) -> Any:
    """A dataclass field that may differ between a run and its resumption: it says where, how
    or under what name the run executes, never what it computes."""
    return dataclasses.field(default=default, metadata={_EXECUTION: True}, **kwargs)


def execution_fields(cls: Any) -> frozenset[str]:
    """Names of the fields of dataclass `cls` (or of its instance) marked `execution_field`."""
    return frozenset(f.name for f in dataclasses.fields(cls) if f.metadata.get(_EXECUTION))


# ----------------------------------------------------------------------------- config files


def require_mapping(value: Any, where: str) -> dict[str, Any]:
    """`value` if it is a mapping (None: an empty one), else a ConfigError naming `where`."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
    return value


def check_counts(args: Any, counts: Mapping[str, tuple[int, str]]) -> None:
    """Whole-number command-line flags `{name: (least, what it gives)}` of `args` at least their
    least value, else one ConfigError naming the flag, the value and what to give."""
    for name, (least, what) in counts.items():
        value = getattr(args, name)
        if value < least:
            flag = "--" + name.replace("_", "-")
            raise ConfigError(f"{flag} must be >= {least}, got {value}: give {what}")


def check_keys(values: Mapping[str, Any], valid: Iterable[str], where: str) -> None:
    """A typo in a key must not silently run the default: name it and the valid keys."""
    valid = set(valid)
    unknown = sorted(set(values) - valid)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid: {sorted(valid)}")


def load_yaml(path: str | Path, keys: Iterable[str] | None = None) -> dict[str, Any]:
    """The mapping in the YAML file at `path`, with only `keys` at the top level when given.
    Every way the file can be bad is one ConfigError line; an empty one is bad too (a config
    that says nothing would silently run every default)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {yaml_problem(e)}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file not readable: {path} ({e})") from None
    if raw is None:
        raise ConfigError(f"{path} holds no settings (empty, or only comments): write the "
                          "settings into it, or leave out --config to run the defaults")
    raw = require_mapping(raw, str(path))
    if keys is not None:
        check_keys(raw, keys, str(path))
    return raw


# ----------------------------------------------------------------------------- grids


def expand_grid(axes: Mapping[str, Sequence[Any]], where: str = "grid") -> list[dict[str, Any]]:
    """Every combination of the axes' values, as {axis: value} dicts, the first axis outermost
    (`itertools.product` order). No axes: one empty cell. An empty axis or a repeated value is
    a ConfigError: the first would run nothing, the second the same cell twice."""
    for key, values in axes.items():
        if not isinstance(values, list | tuple) or not values:
            raise ConfigError(f"{where}.{key} must be a non-empty list")
        repeated = [v for i, v in enumerate(values) if v in values[:i]]
        if repeated:
            raise ConfigError(f"{where}.{key} lists {repeated[0]!r} more than once")
    keys = list(axes)
    return [dict(zip(keys, combo, strict=True))
            for combo in itertools.product(*(axes[k] for k in keys))]


# ----------------------------------------------------------------------------- resuming


def _flat_json(cfg: Any) -> dict[str, Any]:
    """A dataclass or mapping as its JSON round trip would read back (tuples become lists),
    nested mappings flattened to dotted keys so a difference names the leaf that differs."""
    values = dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg)
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            flat[prefix] = value

    walk("", json.loads(json.dumps(values)))
    return flat


def check_same_config(where: str | Path, holds: str, old: Any, new: Any,
                      ignore: Iterable[str] = (), start_over: str | Path | None = None) -> None:
    """Raise ResumeError naming every field (outside `ignore`) where `old` and `new` differ.

    `holds` says what `where` has from `old` ("3 finished cell(s)"); `start_over` what to
    delete to discard it (default: `where`). `ignore` names top-level fields.
    """
    old, new, skip = _flat_json(old), _flat_json(new), set(ignore)
    diff = sorted(k for k in set(old) | set(new)
                  if k.split(".")[0] not in skip and old.get(k) != new.get(k))
    if diff:
        detail = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff)
        raise ResumeError(f"{where} holds {holds} from a different config ({detail}). "
                          f"Use another --out, or delete {start_over or where} to start over.")


def read_cells(out_dir: Path, cfg: Any, grid_fields: Iterable[str]) -> list[dict[str, Any]]:
    """Finished cells in `out_dir/cells.jsonl`, after checking that the config in
    `out_dir/meta.json` equals `cfg` up to `grid_fields` (the axes, which may grow or shrink)
    and `cfg`'s execution fields. A torn last line (a kill mid-append) is not a cell."""
    path = Path(out_dir) / CELLS
    cells = read_jsonl(path)
    meta = Path(out_dir) / META
    if cells and meta.exists():
        old = json.loads(meta.read_text()).get("config", {})
        check_same_config(out_dir, f"{len(cells)} finished cell(s)", old, cfg,
                          set(grid_fields) | execution_fields(cfg), path)
    return cells


def append_cell(out_dir: Path, cell: dict[str, Any]) -> None:
    """Append one finished cell durably (a kill after this returns loses nothing)."""
    with (Path(out_dir) / CELLS).open("a") as f:
        f.write(json.dumps(cell) + "\n")
        f.flush()
        os.fsync(f.fileno())


def resume_grid(out_dir: Path, cfg: Any, axes: Mapping[str, str]
                ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(finished cells, cells still to run) of the grid that dataclass `cfg` spans.

    `axes` maps a cell's key to the config field listing its values, outermost first
    (`{"seed": "seeds", "skew": "skews"}`); a finished cell is a record in `cells.jsonl`
    carrying the same value under every key.
    """
    done = read_cells(out_dir, cfg, axes.values())
    name = getattr(cfg, "name", type(cfg).__name__)
    grid = expand_grid({field: tuple(getattr(cfg, field)) for field in axes.values()}, where=name)
    todo = [cell for cell in ({key: c[field] for key, field in axes.items()} for c in grid)
            if not any(all(d.get(k) == v for k, v in cell.items()) for d in done)]
    return done, todo
