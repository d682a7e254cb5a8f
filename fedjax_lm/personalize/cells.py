"""Finished grid cells in `out_dir/cells.jsonl`, reused on a rerun only under the same config.

A grid (skews × seeds, activations, arms) is resumable: each finished cell is appended as one
JSON line, and a rerun skips it. Resuming under a changed config would silently mix numbers from
two setups in one table, so the config that produced the cells (kept in `meta.json`) must match
the current one in every field except the grid axes, which may grow or shrink.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from fedjax_lm.runner.config import ConfigError

CELLS = "cells.jsonl"
META = "meta.json"
# A label, and where the data or scratch space lives, do not change what a cell computes.
_LABEL_FIELDS = ("name", "data_dir", "work_dir")


class ResumeError(ConfigError):
    """`out_dir` holds cells from a different config."""


def read_cells(out_dir: Path, cfg: Any, grid_fields: tuple[str, ...]) -> list[dict[str, Any]]:
    """Finished cells in `out_dir`, after checking they came from `cfg` (up to `grid_fields`).

    Raises ResumeError naming every differing field, so the user can pick a fresh `--out`.
    """
    path = out_dir / CELLS
    if not path.exists():
        return []
    cells = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    meta_path = out_dir / META
    if cells and meta_path.exists():
        old = json.loads(meta_path.read_text()).get("config", {})
        new = json.loads(json.dumps(dataclasses.asdict(cfg)))  # tuples → lists, like the file
        skip = set(grid_fields) | set(_LABEL_FIELDS)
        diff = sorted(k for k in set(old) | set(new)
                      if k not in skip and old.get(k) != new.get(k))
        if diff:
            detail = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff)
            raise ResumeError(
                f"{out_dir} holds {len(cells)} finished cell(s) from a different config "
                f"({detail}). Use another --out, or delete {path} to start over."
            )
    return cells


def append_cell(out_dir: Path, cell: dict[str, Any]) -> None:
    """Append one finished cell durably (a kill after this returns loses nothing)."""
    with (out_dir / CELLS).open("a") as f:
        f.write(json.dumps(cell) + "\n")
        f.flush()
        os.fsync(f.fileno())
