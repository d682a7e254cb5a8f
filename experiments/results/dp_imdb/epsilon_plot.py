"""epsilon_accuracy.csv and epsilon_accuracy.png from the sweep's run directories.

    python experiments/results/dp_imdb/epsilon_plot.py   (after the sweep; reads runs/)
"""

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from fedjax_lm.io import atomic_savefig, write_csv  # noqa: E402

HERE = Path(__file__).resolve().parent
rows = []
for final in sorted((HERE / "runs").glob("*/final.json")):
    f = json.loads(final.read_text())
    rows.append({"target_epsilon": f["config"]["target_epsilon"], "seed": f["config"]["seed"],
                 "epsilon": f["epsilon"], "noise_multiplier": f["dp_noise_multiplier_used"],
                 "final_accuracy": f["final_accuracy"], "best_accuracy": f["best_accuracy"],
                 "dp_overflow_delta": f["dp_overflow_delta"],
                 "truncated_clients": f["truncated_clients"]})
write_csv(HERE / "epsilon_accuracy.csv", rows)
targets = sorted({r["target_epsilon"] or math.inf for r in rows})
xs = np.arange(len(targets))
acc = [[r["final_accuracy"] for r in rows if (r["target_epsilon"] or math.inf) == t]
       for t in targets]
fig, ax = plt.subplots(figsize=(5, 3.5))
ax.errorbar(xs, [np.mean(a) for a in acc], yerr=[np.std(a, ddof=1) if len(a) > 1 else 0
                                                 for a in acc], marker="o", capsize=3,
            label="DP-FedAvg, mean ± sd over seeds")
for x, a in zip(xs, acc, strict=True):
    ax.scatter([x] * len(a), a, color="gray", s=8, zorder=3)
ax.axhline(0.5, color="k", lw=0.8, ls=":", label="chance (2 classes)")
ax.set_xticks(xs, [("∞" if math.isinf(t) else f"{t:g}") for t in targets])
ax.set_xlabel("ε at δ = 1/N^1.1 after 20 rounds")
ax.set_ylabel("final test accuracy")
ax.set_ylim(0.4, 0.7)  # a zoomed axis would dress up noise around chance
ax.set_title("IMDB, 1,000 clients, q = 0.1, preset:tiny (CPU scale)", fontsize=9)
ax.legend(fontsize=7)
fig.tight_layout()
atomic_savefig(fig, HERE / "epsilon_accuracy.png")
