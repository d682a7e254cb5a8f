"""Results on disk: results.csv (one row per run), table.md (mean ± std over seeds), plot.png
and meta.json (command, wall time, machine). Pure functions of the finished cells, so they are
rewritten after every cell and a partial run still leaves a consistent report."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedjax_lm.grid import META
from fedjax_lm.io import atomic_savefig, atomic_write_text, write_csv


def machine() -> str:
    import jax

    cpus = os.cpu_count()
    return f"{platform.machine()} CPU, {cpus} cores visible, jax {jax.__version__} " \
           f"({jax.default_backend()})"


def mean_std(values: Sequence[float]) -> str:
    v = np.asarray(values, dtype=np.float64)
    std = v.std(ddof=1) if len(v) > 1 else 0.0
    return f"{100 * v.mean():.1f} ± {100 * std:.1f}"


def write_meta(out_dir: Path, cfg: Any, command: str, wall_s: float, **extra: Any) -> None:
    """meta.json: how the results were made; its config is what a rerun must match to reuse
    the finished cells (`grid.read_cells`)."""
    meta = {"command": command, "wall_s": round(wall_s, 1), "machine": machine(),
            "config": dataclasses.asdict(cfg), **extra}
    atomic_write_text(out_dir / META, json.dumps(meta, indent=2) + "\n")


def write_results(out_dir: Path, rows: list[dict[str, Any]], table: str, cfg: Any, command: str,
                  wall_s: float, **extra: Any) -> None:
    """What every experiment leaves beside its plots: results.csv (one row per run), table.md
    and meta.json."""
    write_csv(out_dir / "results.csv", rows)
    atomic_write_text(out_dir / "table.md", table)
    write_meta(out_dir, cfg, command, wall_s, **extra)


# ----------------------------------------------------------------------------- paper 2


def moe_rows(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (skew, seed, method): means over the evaluation clients."""
    rows = []
    for cell in sorted(cells, key=lambda c: (c["skew"], c["seed"])):
        opt = np.asarray(cell["opted_out_eval"], bool)
        for method, rec in cell["methods"].items():
            la, ga = np.asarray(rec["local_acc"]), np.asarray(rec["global_acc"])
            row = {"skew": cell["skew"], "seed": cell["seed"], "method": method,
                   "local_acc": round(float(la.mean()), 4),
                   "global_acc": round(float(ga.mean()), 4),
                   "eval_clients": len(la), "opted_out_eval_clients": int(opt.sum()),
                   "local_acc_opted_out": round(float(la[opt].mean()), 4) if opt.any() else "",
                   "gate_local": round(float(np.mean(rec["gate_local"])), 4)
                   if "gate_local" in rec else "",
                   "gate_global": round(float(np.mean(rec["gate_global"])), 4)
                   if "gate_global" in rec else "",
                   "fedavg_best_round": cell["fedavg_best_round"],
                   "cell_wall_s": round(cell["wall_s"], 1)}
            rows.append(row)
    return rows


def moe_table(rows: list[dict[str, Any]], skew_name: str) -> str:
    methods = list(dict.fromkeys(r["method"] for r in rows))
    skews = sorted({r["skew"] for r in rows})
    lines = []
    for metric, title in (("local_acc", "local test"), ("global_acc", "global test")):
        lines.append(f"**{title} accuracy (%)**, mean ± std over seeds (n = seeds)\n")
        lines.append("| method | " + " | ".join(f"{skew_name}={s:g}" for s in skews) + " |")
        lines.append("| --- |" + " --- |" * len(skews))
        for m in methods:
            cells = []
            for s in skews:
                v = [r[metric] for r in rows if r["method"] == m and r["skew"] == s]
                cells.append(f"{mean_std(v)} (n={len(v)})" if v else "–")
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("")
    gates = [r for r in rows if r["method"] == "mixture" and r["gate_local"] != ""]
    if gates:
        lines.append("**mean gate value g (weight of the local expert)**, mixture\n")
        lines.append("| | " + " | ".join(f"{skew_name}={s:g}" for s in skews) + " |")
        lines.append("| --- |" + " --- |" * len(skews))
        for key, title in (("gate_local", "on local test"), ("gate_global", "on global test")):
            vals = []
            for s in skews:
                v = [r[key] for r in gates if r["skew"] == s]
                vals.append(f"{np.mean(v):.2f}" if v else "–")
            lines.append(f"| {title} | " + " | ".join(vals) + " |")
        lines.append("")
    return "\n".join(lines)


def moe_plot(path: Path, rows: list[dict[str, Any]], skew_name: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(r["method"] for r in rows))
    skews = sorted({r["skew"] for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, metric, sub in zip(axes, ("local_acc", "global_acc"),
                               ("local test (client's own skew)", "global test (balanced)"),
                               strict=True):
        for m in methods:
            mu, sd = [], []
            for s in skews:
                v = np.asarray([r[metric] for r in rows if r["method"] == m and r["skew"] == s])
                mu.append(v.mean() if len(v) else np.nan)
                sd.append(v.std(ddof=1) if len(v) > 1 else 0.0)
            ax.errorbar(skews, mu, yerr=sd, marker="o", capsize=3, label=m)
        ax.set_xlabel(skew_name)
        ax.set_title(sub)
        ax.grid(alpha=0.3)
        if skew_name == "alpha":
            ax.set_xscale("log")
    axes[0].set_ylabel("accuracy (mean over eval clients; ± std over seeds)")
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=120)


def write_moe(out_dir: Path, cells: list[dict[str, Any]], cfg: Any, command: str,
              wall_s: float) -> None:
    rows = moe_rows(cells)
    skew_name = "p" if cfg.partition == "majority" else "alpha"
    moe_plot(out_dir / "plot.png", rows, skew_name, f"{cfg.name}: {cfg.task}, {cfg.model}")
    write_results(out_dir, rows, moe_table(rows, skew_name), cfg, command, wall_s,
                  cells_done=len(cells))
