"""Convergence table and plot of paper 1 powered (experiments/paper1_powered*.yaml, issue 20).

    python experiments/paper1_powered_report.py experiments/results/paper1_powered

reads every finished run under OUT's run folders (`RUN_DIRS`, the runner's own `load_runs`) and
writes OUT/convergence.md: for each task, model, client optimizer (arm) and client count C, over
the seeds (mean ± sample std, n = seeds): final and best test accuracy; the **late gain**,
accuracy at the last evaluation minus accuracy three evaluations earlier (6 rounds here) — near
0 means the curve has flattened, clearly positive means still climbing, so "slower" is told
from "plateaued"; and **rounds to target**, the first evaluated round at or above 95 % of the
same task, model and arm's C = 1 best accuracy (mean over seeds), "–" for a seed that never got
there (counted in "reached"). OUT/convergence.png draws the same numbers against C (one column
per task; rows: best, final, rounds to target; error bars ± sample std over seeds) for the arms
run with more than one seed. The sweep's own `fedjax-lm report` draws the curves.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path
from typing import NamedTuple

import numpy as np

from fedjax_lm.io import atomic_savefig, atomic_write_text
from fedjax_lm.runner.report import (
    accuracy_curve,
    late_gain,
    load_runs,
    points_mean_std,
    sample_std,
)

# The Adam 3e-4 main arm, blog10's, the SGD probe (paper1_sgd_probe.yaml), an SGD arm.
RUN_DIRS = ("runs", "runs_blog10", "sgd_probe/runs", "runs_sgd")
TARGET_OF_C1 = 0.95  # rounds to reach this fraction of C = 1's best accuracy
LATE = 3  # evaluations back for the late gain


class Cell(NamedTuple):
    """One (task, model, arm, C) over its seeds: per-seed values, in the seeds' order."""

    task: str
    model: str
    arm: str
    clients: int
    final: list[float]
    best: list[float]
    late_gain: list[float]
    to_target: list[int | None] | None  # None: no C = 1 cell to set the target


def arm(config: dict) -> str:
    """The client optimizer and learning rate, e.g. `sgd 0.03`."""
    return f"{config['client_optimizer']} {config['lr']:g}"


def cells(runs: list[dict]) -> list[Cell]:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in runs:
        c = r["config"]
        groups[(c["task"], c["model"], arm(c), c["clients"])].append(r)
    c1_best = {(t, m, a): np.mean([r["best_accuracy"] for r in rs])
               for (t, m, a, c), rs in groups.items() if c == 1}
    out = []
    for (task, model, opt, clients), rs in sorted(groups.items()):
        target = c1_best.get((task, model, opt))
        gains, hits = [], []
        for r in rs:
            rounds, acc = accuracy_curve(r)
            gains.append(late_gain(r, LATE))
            if target is not None:
                hit = [x for x, a in zip(rounds, acc, strict=True) if a >= TARGET_OF_C1 * target]
                hits.append(hit[0] if hit else None)
        out.append(Cell(task, model, opt, clients, [r["final_accuracy"] for r in rs],
                        [r["best_accuracy"] for r in rs], gains,
                        hits if target is not None else None))
    return out


def reached(cell: Cell) -> list[int]:
    return [h for h in cell.to_target or [] if h is not None]


def table(cs: list[Cell]) -> list[str]:
    out = ["| task | model | arm | C | seeds | final acc (%) | best acc (%) | "
           "late gain (points) | rounds to target | reached |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for c in cs:
        hit = reached(c)
        to_target = ("(no C = 1)" if c.to_target is None
                     else f"{np.mean(hit):.1f}" if hit else "–")
        out.append(f"| {c.task} | {c.model} | {c.arm} | {c.clients} | {len(c.final)} | "
                   f"{points_mean_std(c.final)} | {points_mean_std(c.best)} | "
                   f"{points_mean_std(c.late_gain)} | "
                   f"{to_target} | {len(hit)}/{len(c.final)} |")
    return out


def plot(cs: list[Cell], path: Path) -> None:
    """Best, final and rounds to target against C, one column per task, one line per model and
    arm (arms with more than one seed somewhere); unreached seeds are left out of the rounds
    and counted next to the point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeded = {(c.model, c.arm) for c in cs if len(c.final) > 1}
    cs = [c for c in cs if (c.model, c.arm) in seeded]
    tasks = sorted({c.task for c in cs})
    if not tasks:
        return
    rows = (("best test accuracy (%)", lambda c: 100 * np.asarray(c.best)),
            ("final test accuracy (%)", lambda c: 100 * np.asarray(c.final)),
            ("rounds to target", lambda c: np.asarray(reached(c), dtype=float)))
    fig, axes = plt.subplots(len(rows), len(tasks), figsize=(max(5.0, 3.8 * len(tasks)), 8.4),
                             squeeze=False, sharex=True)
    for col, task in enumerate(tasks):
        for model, opt in sorted(seeded):
            line = sorted((c for c in cs if (c.task, c.model, c.arm) == (task, model, opt)),
                          key=lambda c: c.clients)
            if not line:
                continue
            for row, (_, values) in enumerate(rows):
                ax = axes[row][col]
                pts = [(c, values(c)) for c in line if len(values(c))]
                xs = [c.clients for c, _ in pts]
                ax.errorbar(xs, [v.mean() for _, v in pts],
                            yerr=[float(sample_std(v)) for _, v in pts], marker="o", ms=4,
                            capsize=3, label=f"{model} ({opt})")
                if row == 2:
                    for c, v in pts:
                        if len(v) < len(c.final):
                            ax.annotate(f"{len(v)}/{len(c.final)}", (c.clients, v.mean()),
                                        textcoords="offset points", xytext=(4, 4), fontsize=7)
        axes[0][col].set_title(task)
        for row, (label, _) in enumerate(rows):
            ax = axes[row][col]
            ax.set_xscale("log", base=2)
            ax.set_xticks([1, 2, 4, 8, 16, 32], ["1", "2", "4", "8", "16", "32"])
            ax.grid(alpha=0.3)
            if col == 0:
                ax.set_ylabel(label)
        axes[-1][col].set_xlabel("clients C")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("mean ± sample std over seeds\ntarget: 95 % of C = 1's best "
                 "(k/n: seeds that reached it)", fontsize=8)
    fig.tight_layout()
    atomic_savefig(fig, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    args = p.parse_args(argv)
    runs = [r for sub in RUN_DIRS if (args.out / sub).is_dir()
            for r in load_runs(args.out / sub)]
    if not runs:
        raise SystemExit(f"no finished runs under {args.out}/runs*: run the sweeps first")
    cs = cells(runs)
    text = ["# Paper 1 powered: convergence by client count", "",
            f"{len(runs)} finished runs. Late gain: accuracy at the last evaluation minus "
            f"{LATE} evaluations earlier. Target: {TARGET_OF_C1:.0%} of the same task, model "
            "and arm's C = 1 best accuracy (mean over seeds); rounds to target averaged over "
            "the seeds that reached it. Plot: `convergence.png`.", ""] + table(cs)
    atomic_write_text(args.out / "convergence.md", "\n".join(text) + "\n")
    plot(cs, args.out / "convergence.png")
    print(f"wrote {args.out / 'convergence.md'} and convergence.png ({len(runs)} runs)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
