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
per task; rows: best and final, mean ± sample std over seeds; rounds to target, every seed a
dot or, never reached, an ×) for the arms run with more than one seed. The sweep's own
`fedjax-lm report` draws the curves.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path
from typing import NamedTuple

import numpy as np

from fedjax_lm.io import atomic_savefig, atomic_write_text
from fedjax_lm.runner.report import (
    MARKERS,
    accuracy_curve,
    dodge,
    late_gain,
    load_runs,
    points_mean_std,
    qualitative_colours,
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
    """Best, final and rounds to target against C, one column per task, one colour per model and
    arm (arms with more than one seed somewhere), the lines dodged sideways. Accuracies: mean ±
    sample std over seeds. Rounds to target: every seed a dot, the line the mean of the seeds
    that reached the target; a seed that never reached it is an × on the "never" row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeded = sorted({(c.model, c.arm) for c in cs if len(c.final) > 1})
    cs = [c for c in cs if (c.model, c.arm) in seeded]
    tasks = sorted({c.task for c in cs})
    if not tasks:
        return
    colour = dict(zip(seeded, qualitative_colours(len(seeded)), strict=True))
    shift = dict(zip(seeded, dodge(len(seeded), 0.16), strict=True))
    marker = {line: MARKERS[i % len(MARKERS)] for i, line in enumerate(seeded)}
    fig, axes = plt.subplots(3, len(tasks), figsize=(max(5.0, 3.8 * len(tasks)), 9.0),
                             squeeze=False, sharex=True)
    for col, task in enumerate(tasks):
        lines = {line: sorted((c for c in cs if (c.task, c.model, c.arm) == (task, *line)),
                              key=lambda c: c.clients) for line in seeded}
        for row, values in ((0, lambda c: 100 * np.asarray(c.best)),
                            (1, lambda c: 100 * np.asarray(c.final))):
            for line, cells_ in lines.items():
                if cells_:
                    v = [values(c) for c in cells_]
                    axes[row][col].errorbar(
                        [c.clients * shift[line] for c in cells_], [x.mean() for x in v],
                        yerr=[float(sample_std(x)) for x in v], marker=marker[line], ms=4,
                        capsize=3, color=colour[line])
        _rounds_panel(axes[2][col], lines, colour, shift, marker)
        axes[0][col].set_title(task)
        for ax in axes[:, col]:
            ax.set_xscale("log", base=2)
            ax.set_xticks([1, 2, 4, 8, 16, 32], ["1", "2", "4", "8", "16", "32"])
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            ax.grid(alpha=0.3)
        axes[-1][col].set_xlabel("clients C")
    for ax, label in zip(axes[:, 0], ("best test accuracy (%)\nmean ± std over seeds",
                                      "final test accuracy (%)\nmean ± std over seeds",
                                      "rounds to target"), strict=True):
        ax.set_ylabel(label)
    handles = [plt.Line2D([], [], color=colour[line], marker=marker[line], ms=5)
               for line in seeded]
    labels = [f"{model} ({opt})" for model, opt in seeded]
    handles += [plt.Line2D([], [], color="0.3", marker="o", ls="none", ms=4, alpha=0.6),
                plt.Line2D([], [], color="0.3", marker="x", ls="none", ms=6)]
    labels += ["rounds to target: one seed", "a seed that never reached it"]
    fig.legend(handles, labels, loc="upper center", ncol=len(handles), fontsize=8,
               frameon=False, bbox_to_anchor=(0.5, 0.955))
    fig.suptitle("target: 95 % of the same model's C = 1 best accuracy; rounds-to-target line: "
                 "mean of the seeds that reached it", fontsize=9, y=0.99)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    atomic_savefig(fig, path)


def _rounds_panel(ax, lines: dict, colour: dict, shift: dict, marker: dict) -> None:
    """Rounds to target per seed (dots, spread a little sideways so that equal rounds stay
    countable), the reached seeds' mean (line), unreached seeds (×) on a "never" row on top."""
    import matplotlib

    reached_all = [h for cells_ in lines.values() for c in cells_ for h in reached(c)]
    top = max(reached_all, default=1)
    never = top + max(2.0, 0.15 * top)
    for line, cells_ in lines.items():
        pts = [c for c in cells_ if c.to_target is not None]
        if not pts:
            continue
        xs, means = [], []
        for c in pts:
            x = c.clients * shift[line]
            hits = c.to_target or []
            spread = dodge(len(hits), 0.05)
            for i, h in enumerate(hits):
                ax.scatter(x * spread[i], never if h is None else h, s=22 if h is None else 15,
                           marker="x" if h is None else "o", color=colour[line],
                           alpha=1.0 if h is None else 0.55, linewidths=1.2 if h is None else 0)
            if reached(c):
                xs.append(x)
                means.append(np.mean(reached(c)))
        ax.plot(xs, means, marker=marker[line], ms=4, color=colour[line], lw=1.4)
    ticks = [t for t in matplotlib.ticker.MaxNLocator(nbins=5, integer=True).tick_values(0, top)
             if 0 <= t <= top]
    ax.set_yticks([*ticks, never], [f"{t:g}" for t in ticks] + ["never"])
    ax.axhline((top + never) / 2, color="0.7", lw=0.8, ls="--")
    ax.set_ylim(0, never + 0.35 * (never - top))


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
