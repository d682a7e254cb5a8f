"""Convergence table of paper 1 powered (experiments/paper1_powered*.yaml, issue 20).

    python experiments/paper1_powered_report.py experiments/results/paper1_powered

reads every finished run under OUT's run folders (`RUN_DIRS`, the runner's own `load_runs`) and
writes OUT/convergence.md: for each task, model, client optimizer (arm) and client count C, over
the seeds (mean ±
sample std, n = seeds): final and best test accuracy; the **late gain**, accuracy at the last
evaluation minus accuracy three evaluations earlier (6 rounds here) — near 0 means the curve
has flattened, clearly positive means still climbing, so "slower" is told from "plateaued";
and **rounds to target**, the first evaluated round at or above 95 % of the same task, model
and arm's C = 1 best accuracy (mean over seeds), "–" for a seed that never got there (counted in
"reached"). The sweep's own `fedjax-lm report` draws the curves and accuracy-vs-C plots.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import numpy as np

from fedjax_lm.io import atomic_write_text
from fedjax_lm.runner.report import load_runs

# The Adam 3e-4 main arm, blog10's, the SGD probe (paper1_sgd_probe.yaml), an SGD arm.
RUN_DIRS = ("runs", "runs_blog10", "sgd_probe/runs", "runs_sgd")
TARGET_OF_C1 = 0.95  # rounds to reach this fraction of C = 1's best accuracy
LATE = 3  # evaluations back for the late gain


def curve(run: dict) -> tuple[list[int], list[float]]:
    pts = [(m["round"], m["eval_accuracy"]) for m in run["metrics"] if "eval_accuracy" in m]
    return [r for r, _ in pts], [a for _, a in pts]


def mean_sd(values: list[float], scale: float = 100.0, fmt: str = ".1f") -> str:
    v = scale * np.asarray(values, dtype=float)
    sd = v.std(ddof=1) if len(v) > 1 else 0.0
    return f"{v.mean():{fmt}} ± {sd:{fmt}}"


def arm(config: dict) -> str:
    """The client optimizer and learning rate, e.g. `sgd 0.03`."""
    return f"{config['client_optimizer']} {config['lr']:g}"


def rows(runs: list[dict]) -> list[str]:
    cells: dict[tuple, list[dict]] = defaultdict(list)
    for r in runs:
        c = r["config"]
        cells[(c["task"], c["model"], arm(c), c["clients"])].append(r)
    c1_best = {(t, m, a): np.mean([r["best_accuracy"] for r in rs])
               for (t, m, a, c), rs in cells.items() if c == 1}
    out = ["| task | model | arm | C | seeds | final acc (%) | best acc (%) | "
           "late gain (points) | rounds to target | reached |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for (task, model, opt, clients), rs in sorted(cells.items()):
        gains, hits = [], []
        target = c1_best.get((task, model, opt))
        for r in rs:
            rounds, acc = curve(r)
            gains.append(acc[-1] - acc[-1 - LATE] if len(acc) > LATE else np.nan)
            if target is not None:
                hit = [x for x, a in zip(rounds, acc, strict=True) if a >= TARGET_OF_C1 * target]
                hits.append(hit[0] if hit else None)
        reached = [h for h in hits if h is not None]
        to_target = (f"{np.mean(reached):.1f}" if reached else "–") if target is not None \
            else "(no C = 1)"
        out.append(f"| {task} | {model} | {opt} | {clients} | {len(rs)} | "
                   f"{mean_sd([r['final_accuracy'] for r in rs])} | "
                   f"{mean_sd([r['best_accuracy'] for r in rs])} | {mean_sd(gains)} | "
                   f"{to_target} | {len(reached)}/{len(rs)} |")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    args = p.parse_args(argv)
    runs = [r for sub in RUN_DIRS if (args.out / sub).is_dir()
            for r in load_runs(args.out / sub)]
    if not runs:
        raise SystemExit(f"no finished runs under {args.out}/runs*: run the sweeps first")
    text = ["# Paper 1 powered: convergence by client count", "",
            f"{len(runs)} finished runs. Late gain: accuracy at the last evaluation minus "
            f"{LATE} evaluations earlier. Target: {TARGET_OF_C1:.0%} of the same task, model "
            "and arm's C = 1 best accuracy (mean over seeds); rounds to target averaged over "
            "the seeds that reached it.", ""] + rows(runs)
    atomic_write_text(args.out / "convergence.md", "\n".join(text) + "\n")
    print(f"wrote {args.out / 'convergence.md'} ({len(runs)} runs)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
