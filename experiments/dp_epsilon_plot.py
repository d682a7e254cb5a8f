"""epsilon_accuracy.csv and epsilon_accuracy.png of a DP sweep's run directories.

    python experiments/dp_epsilon_plot.py experiments/results/dp_imdb_head "title"

Reads <folder>/runs/*/final.json (the ε grid) and, when present, <folder>/runs_nonprivate/
(the same runs without clipping or noise: drawn as a band, mean ± sd over its seeds).
"""

import json
import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from fedjax_lm.io import atomic_savefig, write_csv  # noqa: E402


def read_rows(runs: Path, private: bool) -> list[dict]:
    rows = []
    for final in sorted(runs.glob("*/final.json")):
        f = json.loads(final.read_text())
        c = f["config"]
        rows.append({"setting": "dp" if private else "non-private",
                     "target_epsilon": c["target_epsilon"] if private else "",
                     "seed": c["seed"], "rounds": f["rounds"],
                     "epsilon": f.get("epsilon", math.inf),  # no DP: no epsilon key
                     "noise_multiplier": f.get("dp_noise_multiplier_used"),
                     "final_accuracy": f["final_accuracy"], "best_accuracy": f["best_accuracy"],
                     "final_eval_loss": f["final_eval_loss"],
                     "dp_overflow_delta": f.get("dp_overflow_delta"),
                     "truncated_clients": f.get("truncated_clients", 0)})
    return rows


def main(folder: Path, title: str) -> None:
    rows = read_rows(folder / "runs", True)
    base = read_rows(folder / "runs_nonprivate", False)
    write_csv(folder / "epsilon_accuracy.csv", rows + base)
    targets = sorted({r["target_epsilon"] or math.inf for r in rows})
    xs = np.arange(len(targets))
    acc = [[r["final_accuracy"] for r in rows if (r["target_epsilon"] or math.inf) == t]
           for t in targets]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.errorbar(xs, [np.mean(a) for a in acc],
                yerr=[np.std(a, ddof=1) if len(a) > 1 else 0 for a in acc], marker="o",
                capsize=3, label="DP-FedAvg, mean ± sd over seeds")
    for x, a in zip(xs, acc, strict=True):
        ax.scatter([x] * len(a), a, color="gray", s=8, zorder=3)
    if base:
        b = [r["final_accuracy"] for r in base]
        sd = np.std(b, ddof=1) if len(b) > 1 else 0.0
        ax.axhspan(np.mean(b) - sd, np.mean(b) + sd, color="tab:green", alpha=0.2, lw=0)
        ax.axhline(np.mean(b), color="tab:green", lw=1,
                   label=f"non-private (no clip, no noise), {len(b)} seeds")
    ax.axhline(0.5, color="k", lw=0.8, ls=":", label="chance (2 classes)")
    ax.set_xticks(xs, [("∞ (clip only)" if math.isinf(t) else f"{t:g}") for t in targets])
    ax.set_xlabel(f"ε at δ = 1/N^1.1 after {rows[0]['rounds']} rounds")
    ax.set_ylabel("final test accuracy")
    ax.set_ylim(0.4, 0.9)  # the full useful range: a zoomed axis would dress up small gaps
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_savefig(fig, folder / "epsilon_accuracy.png")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "")
