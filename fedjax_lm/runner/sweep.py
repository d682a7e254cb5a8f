"""A sweep: the grid of a preset (models × tasks × client counts × seeds × any field).

Each cell is an ordinary run in its own directory, so rerunning a sweep skips finished
cells and resumes the unfinished one from its checkpoint, after checking that every cell
already on disk was made under the config it would now get.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from fedjax_lm import interrupts
from fedjax_lm.grid import CELL_ENV, ConfigError, expand_grid
from fedjax_lm.io import write_yaml
from fedjax_lm.runner import rundir
from fedjax_lm.runner.checks import check_given_used, from_dict, unused_fields, unused_message
from fedjax_lm.runner.config import RunConfig
from fedjax_lm.runner.presets import Preset, VectorizeOptions
from fedjax_lm.runner.report import read_final, write_report
from fedjax_lm.runner.train import TrainingError, train


def _slug(value: Any) -> str:
    return str(value).replace("/", "_").replace(":", "-").replace(" ", "")


def expand(preset: Preset, overrides: dict[str, Any], out: Path) -> list[RunConfig]:
    """All cells, each validated before anything runs; command-line overrides win."""
    grid = {k: v for k, v in preset.grid.items() if k not in overrides}
    cells = []
    for cell in expand_grid(grid, where=f"{preset.name}: sweep"):
        name = ",".join(f"{k}={_slug(v)}" for k, v in cell.items()) or "run"
        try:
            cfg = from_dict({**preset.base, **overrides, **cell, "out": str(out / name)})
        except ConfigError as e:
            raise ConfigError(f"sweep cell {name}: {e}") from None
        cells.append(cfg)
    # a parameter given for the whole sweep that no cell reads: the user meant another setting
    check_given_used(cells[0], [k for k in overrides
                                if all(k in unused_fields(c) for c in cells)])
    _refuse_same_runs(cells)
    return cells


def _refuse_same_runs(cells: list[RunConfig]) -> None:
    """Two cells that compute one run under two names (an axis the cell ignores, e.g. alpha
    under partition iid) would read as two results that agree: refused before anything runs."""
    seen: dict[tuple, RunConfig] = {}
    for cfg in cells:
        unused = unused_fields(cfg)
        ignored = set(unused) | {"out"}
        key = tuple(sorted((k, str(v)) for k, v in cfg.to_dict().items() if k not in ignored))
        first = seen.setdefault(key, cfg)
        if first is not cfg:
            differ = [k for k, v in cfg.to_dict().items() if getattr(first, k) != v
                      and k != "out"]
            raise ConfigError(
                f"sweep cells {Path(first.out).name} and {Path(cfg.out).name} are the same run: "
                f"{unused_message(cfg, differ)}; drop that axis or set what uses it")


def check_resumable(cells: list[RunConfig]) -> None:
    """Refuse, before any cell runs, a sweep folder holding a run made under another config
    (more rounds and execution fields may differ: the run continues where it stopped)."""
    for cfg in cells:
        rundir.check_resumable(cfg, Path(cfg.out))


class CellFailed(TrainingError):
    """A sweep cell's process failed; with exit status 2 it has printed why in one line."""

    def __init__(self, message: str, reported: bool) -> None:
        super().__init__(message)
        self.reported = reported


class CellInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped a sweep cell, which has said so itself (one line, not two)."""

    reported = True


def train_in_subprocess(cfg: RunConfig, *, progress: bool) -> dict:
    """Run one cell as `fedjax-lm train` in a fresh process and read its final.json.

    A long sweep in one process accumulates host memory (compiled programs, allocator
    fragmentation: >10 GB after a dozen MiniLM cells on CPU); a process per cell returns it
    all, and a crash in one cell leaves the others' results intact.
    """
    run_dir = Path(cfg.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    spec = run_dir / "cell.yaml"
    write_yaml(spec, {"name": run_dir.name, "base": cfg.to_dict()})
    cmd = [sys.executable, "-m", "fedjax_lm.cli", "train", "--config", str(spec)]
    if not progress:
        cmd.append("--no-progress")
    proc = subprocess.Popen(cmd, env={**os.environ, CELL_ENV: run_dir.name})
    try:
        code = proc.wait()
    except KeyboardInterrupt:
        # Ctrl-C reached the cell too (one process group); a SIGTERM was ours alone: pass it
        # on. Either way the cell stops cleanly and says so.
        if interrupts.received() == signal.SIGTERM:
            proc.terminate()
        code = proc.wait()
    if code in (130, -signal.SIGINT, -signal.SIGTERM):
        raise CellInterrupted()
    if code != 0:
        raise CellFailed(f"sweep cell {run_dir.name} failed (exit {code}); rerun the sweep to "
                         "resume it", reported=code == 2)
    return read_final(run_dir / "final.json", "rerun the sweep")


def run_sweep(
    preset: Preset, overrides: dict[str, Any], out: Path, *, progress: bool = True,
    isolate: bool = False, vectorize: VectorizeOptions | None = None,
) -> list[dict]:
    """Run every cell (skipping finished ones), then write the report. `isolate` runs each
    cell in its own process (what the CLI does); `vectorize` (default: the preset's) runs
    cells that can share a program as one (runner/vectorized.py)."""
    out = Path(out)
    cells = expand(preset, overrides, out)
    check_resumable(cells)
    finished_before = all((Path(c.out) / "final.json").exists() for c in cells)
    started = time.perf_counter()
    vectorize = vectorize or preset.vectorize

    def run_cell(cfg: RunConfig) -> dict:
        if isolate and not (Path(cfg.out) / "final.json").exists():
            return train_in_subprocess(cfg, progress=progress)
        return train(cfg, progress=progress)

    if vectorize.enabled:
        from fedjax_lm.runner.vectorized import run_vectorized

        todo = [c for c in cells if rundir.check_resumable(c, Path(c.out)) is None]
        done = {c.out: run_cell(c) for c in cells if c not in todo}
        ran = dict(zip([c.out for c in todo], run_vectorized(
            todo, vectorize, run_alone=run_cell, progress=progress), strict=True))
        results = [done.get(c.out) or ran[c.out] for c in cells]
    else:
        results = []
        bar = tqdm(cells, desc=f"sweep {preset.name}", unit="cell", disable=not progress)
        for cfg in bar:
            bar.set_postfix_str(Path(cfg.out).name)
            results.append(run_cell(cfg))
    if not (finished_before and (out / "summary.md").exists()):  # a no-op rerun keeps the
        # report that timed the invocation which did the work (`fedjax-lm report` rewrites it)
        write_report(out, title=preset.name, sweep_wall_s=time.perf_counter() - started)
    return results
