"""Tables and plot of the AG News collapse ablation (experiments/collapse_agnews.yaml, issue 20).

    python experiments/collapse_agnews_report.py experiments/results/collapse_agnews

reads the finished runs under OUT/runs (the runner's own `load_runs`) and writes
OUT/ablation.md and OUT/ablation.png. Each run gets one **outcome**, from its test-accuracy
curve against chance (1 / classes, from the run's data.json):
- `untrained`: the best accuracy stayed within 10 points of chance: the run never left it;
- `collapsed`: it got 10+ points above chance, then ended within 5 points of chance;
- `climbing`: neither, the last three evaluations gained 3+ points and the last is within a
  point of the run's best: still improving, so "slow", not yet a plateau;
- `trained`: neither, and flat at the end.
The thresholds are this report's, stated so that a reader can disagree with them. The first
table lists every (head init, attend to padding, lr, C) over its seeds (mean ± sample std;
outcome counts); the second the **paired effect of each quirk**: per seed, client count and
lr, final accuracy with the quirk minus without it (the other quirk off; and both quirks
minus neither), mean ± sample std over seeds. ablation.png: one panel per (C, lr), one curve
per quirk combination (mean ± sample std over seeds).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from fedjax_lm.io import atomic_savefig, atomic_write_text
from fedjax_lm.runner.report import (
    accuracy_curve,
    late_gain,
    load_runs,
    points_mean_std,
    sample_std,
)

LEFT_CHANCE = 0.10  # best accuracy this far above chance: the run trained at some point
BACK_AT_CHANCE = 0.05  # final accuracy within this of chance: it ended there
CLIMBING = 0.03  # late gain (3 evaluations) at least this ...
AT_BEST = 0.01  # ... and the last evaluation this close to the best: still improving
OUTCOMES = ("trained", "climbing", "collapsed", "untrained")
ARMS = (("shared", False), ("per_client", False), ("shared", True), ("per_client", True))


def chance(run: dict) -> float:
    return 1.0 / json.loads((Path(run["run_dir"]) / "data.json").read_text())["num_classes"]


def outcome(run: dict) -> str:
    floor = chance(run)
    if run["best_accuracy"] < floor + LEFT_CHANCE:
        return "untrained"
    if run["final_accuracy"] <= floor + BACK_AT_CHANCE:
        return "collapsed"
    at_best = run["final_accuracy"] >= run["best_accuracy"] - AT_BEST
    return "climbing" if late_gain(run) >= CLIMBING and at_best else "trained"


def key(run: dict) -> tuple[str, bool, float, int]:
    c = run["config"]
    return c["head_init"], bool(c["attend_to_padding"]), float(c["lr"]), int(c["clients"])


def cells_table(runs: list[dict]) -> list[str]:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in runs:
        groups[key(r)].append(r)
    out = ["| head init | attend to padding | lr | C | seeds | final acc (%) | best acc (%) | "
           "final eval loss | late gain (points) | outcomes |", "|---" * 10 + "|"]
    for (head, pad, lr, c), rs in sorted(groups.items(), key=lambda kv: (kv[0][2], kv[0][3],
                                                                          ARMS.index(kv[0][:2]))):
        counts = Counter(outcome(r) for r in rs)
        told = ", ".join(f"{counts[o]} {o}" for o in OUTCOMES if counts[o])
        loss = np.asarray([r["final_eval_loss"] for r in rs])
        out.append(f"| {head} | {str(pad).lower()} | {lr:g} | {c} | {len(rs)} | "
                   f"{points_mean_std([r['final_accuracy'] for r in rs])} | "
                   f"{points_mean_std([r['best_accuracy'] for r in rs])} | "
                   f"{loss.mean():.3f} ± {float(sample_std(loss)):.3f} | "
                   f"{points_mean_std([late_gain(r) for r in rs])} | {told} |")
    return out


def paired_effects(runs: list[dict]) -> list[str]:
    """Each quirk on minus off (the other quirk off), and both on minus neither, paired by
    seed, C and lr."""
    final = {(*key(r), r["config"]["seed"]): r["final_accuracy"] for r in runs}
    quirks = (("per-client heads", ("per_client", False)), ("attend to padding", ("shared", True)),
              ("both", ("per_client", True)))
    settings = sorted({(lr, c) for (_, _, lr, c, _) in final})
    out = ["| quirk | lr | C | seeds paired | final acc, with minus without (points) |",
           "|---|---|---|---|---|"]
    for name, (head, pad) in quirks:
        for lr, c in settings:
            diffs = [final[(head, pad, lr, c, s)] - final[("shared", False, lr, c, s)]
                     for (h, p, lr2, c2, s) in final
                     if (h, p, lr2, c2) == ("shared", False, lr, c)
                     and (head, pad, lr, c, s) in final]
            if diffs:
                out.append(f"| {name} | {lr:g} | {c} | {len(diffs)} | {points_mean_std(diffs)} |")
    return out


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lrs = sorted({key(r)[2] for r in runs})
    cs = sorted({key(r)[3] for r in runs})
    fig, axes = plt.subplots(len(cs), len(lrs), figsize=(4.2 * len(lrs), 2.8 * len(cs) + 0.8),
                             squeeze=False, sharex=True, sharey=True)
    colours = dict(zip(ARMS, ("tab:blue", "tab:orange", "tab:green", "tab:red"), strict=True))
    for i, c in enumerate(cs):
        for j, lr in enumerate(lrs):
            ax = axes[i][j]
            for arm in ARMS:
                rs = [r for r in runs if key(r) == (*arm, lr, c)]
                if not rs:
                    continue
                curves = [accuracy_curve(r) for r in rs]
                n = min(len(a) for _, a in curves)
                ys = 100 * np.asarray([a[:n] for _, a in curves])
                xs = curves[0][0][:n]
                ax.plot(xs, ys.mean(axis=0), marker="o", ms=3, color=colours[arm])
                if len(rs) > 1:
                    sd = sample_std(ys)
                    ax.fill_between(xs, ys.mean(axis=0) - sd, ys.mean(axis=0) + sd,
                                    color=colours[arm], alpha=0.2, linewidth=0)
            ax.axhline(100 * chance(runs[0]), color="grey", lw=0.8, ls=":")
            ax.set_title(f"C = {c}, lr {lr:g}", fontsize=9)
            ax.grid(alpha=0.3)
        axes[i][0].set_ylabel("test accuracy (%)")
    for ax in axes[-1]:
        ax.set_xlabel("round")
    handles = [plt.Line2D([], [], color=colours[a], marker="o", ms=3) for a in ARMS]
    labels = [f"head {h}, attend to padding {str(p).lower()}" for h, p in ARMS]
    fig.legend(handles, labels, loc="upper center", ncol=2, fontsize=8, frameon=False,
               title="mean ± sample std over seeds; dotted: chance", title_fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.8 / (2.8 * len(cs) + 0.8)))
    atomic_savefig(fig, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    args = p.parse_args(argv)
    runs = load_runs(args.out / "runs") if (args.out / "runs").is_dir() else []
    if not runs:
        raise SystemExit(f"no finished runs under {args.out}/runs: run the sweep first")
    text = ["# Collapse ablation on AG News: outcomes and paired effects", "",
            f"{len(runs)} finished runs. Outcomes (per run): untrained = best accuracy under "
            f"chance + {LEFT_CHANCE:.0%}; collapsed = left chance, then ended within "
            f"{BACK_AT_CHANCE:.0%} of it; climbing = gained ≥ {CLIMBING:.0%} over its last three "
            f"evaluations and ended within {AT_BEST:.0%} of its best; trained = the rest. Plot: "
            "`ablation.png`.", "",
            *cells_table(runs), "",
            "## Paired effect of each quirk (the other one off) and of both together", "",
            *paired_effects(runs), ""]
    atomic_write_text(args.out / "ablation.md", "\n".join(text))
    plot(runs, args.out / "ablation.png")
    print(f"wrote {args.out / 'ablation.md'} and ablation.png ({len(runs)} runs)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
