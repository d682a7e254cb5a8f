"""The robustness table's plot and markdown summary, from `results.csv` (see robust_agnews.py)."""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

import numpy as np


def read(path: Path) -> dict[tuple, list[float]]:
    """(aggregator, attack, fraction) -> accuracies over seeds; the clean runs (fraction 0)
    are filed under every attack."""
    rows = list(csv.DictReader(path.open()))
    attacks = sorted({r["attack"] for r in rows} - {"none"})
    acc: dict[tuple, list[float]] = defaultdict(list)
    for r in rows:
        frac, a = float(r["malicious_fraction"]), float(r["accuracy"])
        for attack in (attacks if r["attack"] == "none" else [r["attack"]]):
            acc[(r["aggregator"], attack, frac)].append(a)
    return acc


def mean_std(values: list[float]) -> tuple[float, float, int]:
    v = np.asarray(values, float)
    n = int(np.isfinite(v).sum())
    return float(np.nanmean(v)), float(np.nanstd(v, ddof=1)) if n > 1 else 0.0, n


def report(out: Path, grid: dict) -> None:
    acc = read(out / "results.csv")
    aggs = [a for a in grid["aggregator"] if any(k[0] == a for k in acc)]
    attacks = grid["attack"]
    fracs = grid["malicious_fraction"]
    plot(out / "robustness.png", acc, aggs, attacks, fracs)
    lines = ["| aggregator | attack | " + " | ".join(f"{f:.0%}" for f in fracs) + " |",
             "|---|---|" + "---|" * len(fracs)]
    for agg in aggs:
        for attack in attacks:
            cells = []
            for f in fracs:
                vals = acc.get((agg, attack, f))
                if not vals:
                    cells.append("–")
                    continue
                m, s, n = mean_std(vals)
                cells.append(f"{m:.3f} ± {s:.3f}" + ("" if n == 3 else f" (n={n})"))
            lines.append(f"| {agg} | {attack} | " + " | ".join(cells) + " |")
    clean = {a: mean_std(acc[(a, attacks[0], 0.0)]) for a in aggs if (a, attacks[0], 0.0) in acc}
    base = clean.get("mean", (np.nan,))[0]
    lines += ["", "| aggregator | clean accuracy | cost vs mean | worst case (attack, fraction) |",
              "|---|---|---|---|"]
    for agg, (m, s, _) in clean.items():
        worst = min(((mean_std(v)[0], k[1], k[2]) for k, v in acc.items()
                     if k[0] == agg and k[2] > 0), default=(np.nan, "", 0))
        lines.append(f"| {agg} | {m:.3f} ± {s:.3f} | {m - base:+.3f} | {worst[0]:.3f} "
                     f"({worst[1]}, {worst[2]:.0%}) |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def plot(path: Path, acc: dict, aggs: list[str], attacks: list[str], fracs: list[float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(attacks), figsize=(3.2 * len(attacks), 4.0), sharey=True,
                             squeeze=False)
    axes = axes[0]
    markers = "osD^vxP"
    for ax, attack in zip(axes, attacks, strict=True):
        for i, agg in enumerate(aggs):
            pts = [(f, *mean_std(acc[(agg, attack, f)])[:2]) for f in fracs
                   if (agg, attack, f) in acc]
            if not pts:
                continue
            x, m, s = map(np.asarray, zip(*pts, strict=True))
            ax.errorbar(100 * x + (i - len(aggs) / 2) * 0.4, m, yerr=s, marker=markers[i % 7],
                        ms=4, capsize=2, lw=1.2, label=agg)
        ax.set_title(attack)
        ax.set_xlabel("malicious clients (%)")
        ax.set_xticks([100 * f for f in fracs])
        ax.grid(alpha=0.3)
        ax.axhline(0.25, color="grey", lw=0.8, ls=":")  # chance, 4 classes
    axes[0].set_ylabel("test accuracy (mean ± std, 3 seeds)")
    axes[-1].legend(fontsize=7, loc="lower left")
    fig.suptitle("AG News, linear bag-of-tokens model, 20 clients, 30 rounds", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
