"""A sweep: the grid of a preset (models × tasks × client counts × seeds × any field).

Each cell is an ordinary run in its own directory, so rerunning a sweep skips finished
cells and resumes the unfinished one from its checkpoint.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from fedjax_lm.runner.config import ConfigError, Preset, RunConfig, from_dict
from fedjax_lm.runner.report import write_report
from fedjax_lm.runner.train import train


def _slug(value: Any) -> str:
    return str(value).replace("/", "_").replace(":", "-").replace(" ", "")


def expand(preset: Preset, overrides: dict[str, Any], out: Path) -> list[RunConfig]:
    """All cells, each validated before anything runs; command-line overrides win."""
    grid = {k: v for k, v in preset.grid.items() if k not in overrides}
    keys = list(grid)
    cells = []
    for values in itertools.product(*(grid[k] for k in keys)):
        cell = dict(zip(keys, values, strict=True))
        name = ",".join(f"{k}={_slug(v)}" for k, v in cell.items()) or "run"
        try:
            cfg = from_dict({**preset.base, **overrides, **cell, "out": str(out / name)})
        except ConfigError as e:
            raise ConfigError(f"sweep cell {name}: {e}") from None
        cells.append(cfg)
    return cells


def run_sweep(
    preset: Preset, overrides: dict[str, Any], out: Path, *, progress: bool = True
) -> list[dict]:
    out = Path(out)
    cells = expand(preset, overrides, out)
    results = []
    started = time.perf_counter()
    bar = tqdm(cells, desc=f"sweep {preset.name}", unit="cell", disable=not progress)
    for cfg in bar:
        bar.set_postfix_str(Path(cfg.out).name)
        results.append(train(cfg, progress=progress))
    write_report(out, title=preset.name, sweep_wall_s=time.perf_counter() - started)
    return results
