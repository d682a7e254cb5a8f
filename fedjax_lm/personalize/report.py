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


def finished_run(out_dir: Path, cells: list[dict[str, Any]]) -> tuple[str, float]:
    """(command, wall seconds) recorded by the run that made `cells`, for rewriting its report
    without training (`--report-only`)."""
    from fedjax_lm.grid import ConfigError

    if not cells:
        raise ConfigError(f"no finished cells in {out_dir}: run the command without "
                          "--report-only first")
    meta = json.loads((Path(out_dir) / META).read_text())
    return meta["command"], float(meta["wall_s"])


def write_results(out_dir: Path, rows: list[dict[str, Any]], table: str, cfg: Any, command: str,
                  wall_s: float, cells: list[dict[str, Any]], **extra: Any) -> None:
    """What every experiment leaves beside its plots: results.csv (one row per run), table.md
    and meta.json.

    meta's `wall_s` is the invocation that wrote it; a resumed run's total is
    `cells_wall_s`, the finished cells' own wall times summed (a cell resumed from its
    checkpoint counts its time before the interruption too)."""
    write_csv(out_dir / "results.csv", rows)
    atomic_write_text(out_dir / "table.md", table)
    cells_wall_s = round(sum(float(c.get("wall_s", 0.0)) for c in cells), 1)
    write_meta(out_dir, cfg, command, wall_s, cells_wall_s=cells_wall_s, **extra)


# ----------------------------------------------------------------------------- paper 2


def _opt(values: Any, pick: np.ndarray) -> float | str:
    """Mean over the picked clients, or '' when none is picked (CSV-friendly)."""
    v = np.asarray(values, dtype=np.float64)
    return round(float(v[pick].mean()), 4) if pick.any() else ""


def moe_rows(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (skew, seed, method): means over the evaluation clients.

    Gate columns (mixture only): `gate_local` the mean gate value g on the local test set,
    `gate_init` the same for the untrained gate, `gate_within_std` the mean over clients of the
    std of g over a client's examples (0 = the gate ignores its input), `gate_between_std` the
    std over clients of their mean g."""
    rows = []
    for cell in sorted(cells, key=lambda c: (c["skew"], c["seed"])):
        opt = np.asarray(cell["opted_out_eval"], bool)
        for method, rec in cell["methods"].items():
            la, ga = np.asarray(rec["local_acc"]), np.asarray(rec["global_acc"])
            row = {"skew": cell["skew"], "seed": cell["seed"], "method": method,
                   "local_acc": round(float(la.mean()), 4),
                   "global_acc": round(float(ga.mean()), 4),
                   "eval_clients": len(la), "opted_out_eval_clients": int(opt.sum()),
                   "local_acc_opted_out": _opt(la, opt),
                   "local_acc_participating": _opt(la, ~opt),
                   "global_acc_opted_out": _opt(ga, opt),
                   "global_acc_participating": _opt(ga, ~opt)}
            gate = {k: "" for k in ("gate_local", "gate_global", "gate_init", "gate_within_std",
                                    "gate_between_std")}
            if "gate_local" in rec:
                g = np.asarray(rec["gate_local"])
                gate.update(gate_local=round(float(g.mean()), 4),
                            gate_global=round(float(np.mean(rec["gate_global"])), 4),
                            gate_between_std=round(float(g.std()), 4))
                if "gate_var_local" in rec:
                    within = np.sqrt(np.asarray(rec["gate_var_local"]))
                    gate.update(gate_within_std=round(float(within.mean()), 4),
                                gate_init=round(float(np.mean(rec["gate_init_local"])), 4))
            row.update(gate)
            be = rec.get("best_epoch")
            row["best_epoch_mean"] = round(float(np.mean(be)), 2) if be is not None else ""
            row["best_epoch_0_frac"] = round(float(np.mean(np.asarray(be) == 0)), 3) \
                if be is not None else ""
            row["epochs_run"] = rec.get("epochs_run", "")
            row["fedavg_best_round"] = cell["fedavg_best_round"]
            row["fedavg_rounds"] = cell.get("fedavg_rounds", "")
            row["cell_wall_s"] = round(cell["wall_s"], 1)
            rows.append(row)
    return rows


def _grid(rows: list[dict[str, Any]], key: str, methods: list[str], skews: list[float],
          skew_name: str, fmt=mean_std) -> list[str]:
    lines = ["| method | " + " | ".join(f"{skew_name}={s:g}" for s in skews) + " |",
             "| --- |" + " --- |" * len(skews)]
    for m in methods:
        cells = []
        for s in skews:
            v = [r[key] for r in rows if r["method"] == m and r["skew"] == s and r[key] != ""]
            cells.append(f"{fmt(v)} (n={len(v)})" if v else "–")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines


def _plain(values: Sequence[float]) -> str:
    v = np.asarray(values, dtype=np.float64)
    std = v.std(ddof=1) if len(v) > 1 else 0.0
    return f"{v.mean():.3f} ± {std:.3f}"


# (a, b, metric, label): the comparisons paper 2's claims rest on, seed by seed.
PAIRED_DIFFERENCES = (
    ("mixture", "finetuned", "local_acc", "mixture − finetuned, local test"),
    ("finetuned", "local", "local_acc", "finetuned − local, local test"),
    ("mixture", "fedavg", "local_acc", "mixture − fedavg, local test"),
    ("fedavg", "mixture", "global_acc", "fedavg − mixture, global test"),
)


def paired_difference(rows: list[dict[str, Any]], key: str, a: str, b: str, skew: float) -> str:
    """`key` of method a minus method b, per seed (in points), then mean ± std over seeds;
    only seeds that have both methods count."""
    by_seed = {}
    for r in rows:
        if r["skew"] == skew and r["method"] in (a, b) and r[key] != "":
            by_seed.setdefault(r["seed"], {})[r["method"]] = r[key]
    diffs = [100 * (v[a] - v[b]) for _, v in sorted(by_seed.items()) if a in v and b in v]
    if not diffs:
        return "–"
    d = np.asarray(diffs)
    std = d.std(ddof=1) if len(d) > 1 else 0.0
    return ", ".join(f"{x:+.1f}" for x in d) + f" ({d.mean():+.1f} ± {std:.1f})"


def moe_table(rows: list[dict[str, Any]], skew_name: str) -> str:
    methods = list(dict.fromkeys(r["method"] for r in rows))
    skews = sorted({r["skew"] for r in rows})
    lines = []
    for metric, title in (("local_acc", "local test"), ("global_acc", "global test")):
        lines.append(f"**{title} accuracy (%)**, mean ± std over seeds (n = seeds; each seed is "
                     "the mean over the evaluation clients)\n")
        lines += _grid(rows, metric, methods, skews, skew_name)
        lines.append("")
    if any(r["opted_out_eval_clients"] for r in rows):
        for who in ("opted_out", "participating"):
            lines.append(f"**local test accuracy (%) of the {who.replace('_', '-')} evaluation "
                         "clients**, mean ± std over seeds\n")
            lines += _grid(rows, f"local_acc_{who}", methods, skews, skew_name)
            lines.append("")
    paired = [(a, b, key, title) for a, b, key, title in PAIRED_DIFFERENCES
              if a in methods and b in methods]
    if paired and len({r["seed"] for r in rows}) > 1:
        lines.append("**paired differences (points)**: method a − method b on the same seed's "
                     "clients, each seed listed, then mean ± std over seeds\n")
        lines.append("| a − b | " + " | ".join(f"{skew_name}={s:g}" for s in skews) + " |")
        lines.append("| --- |" + " --- |" * len(skews))
        for a, b, key, title in paired:
            lines.append(f"| {title} | " + " | ".join(
                paired_difference(rows, key, a, b, s) for s in skews) + " |")
        lines.append("")
    gates = [r for r in rows if r["method"] == "mixture" and r["gate_local"] != ""]
    if gates:
        lines.append("**mixture gate g (weight of the local expert) on the local test set**, "
                     "mean ± std over seeds. *trained*: after training; *untrained*: the same "
                     "clients' freshly initialised gate; *within-client std*: std of g over a "
                     "client's examples (0 = g ignores its input), averaged over clients; "
                     "*between-client std*: std of the clients' mean g\n")
        lines.append("| | " + " | ".join(f"{skew_name}={s:g}" for s in skews) + " |")
        lines.append("| --- |" + " --- |" * len(skews))
        for key, title in (("gate_local", "g trained"), ("gate_init", "g untrained"),
                           ("gate_within_std", "within-client std of g"),
                           ("gate_between_std", "between-client std of g"),
                           ("best_epoch_0_frac", "clients whose best mixture epoch is 0")):
            vals = []
            for s in skews:
                v = [r[key] for r in gates if r["skew"] == s and r[key] != ""]
                vals.append(_plain(v) if v else "–")
            lines.append(f"| {title} | " + " | ".join(vals) + " |")
        lines.append("")
    lines.append("**training length**: mean best epoch / epochs run (personalised methods) and "
                 "FedAvg best round / rounds run, mean over seeds\n")
    lines.append("| | " + " | ".join(f"{skew_name}={s:g}" for s in skews) + " |")
    lines.append("| --- |" + " --- |" * len(skews))
    for m in methods:
        vals = []
        for s in skews:
            rs = [r for r in rows if r["method"] == m and r["skew"] == s]
            if m == "fedavg":
                vals.append(f"{np.mean([r['fedavg_best_round'] for r in rs]):.0f} / "
                            f"{np.mean([r['fedavg_rounds'] or np.nan for r in rs]):.0f}"
                            if rs else "–")
            elif rs and rs[0]["best_epoch_mean"] != "":
                vals.append(f"{np.mean([r['best_epoch_mean'] for r in rs]):.1f} / "
                            f"{np.mean([r['epochs_run'] for r in rs]):.0f}")
            else:
                vals.append("–")
        lines.append(f"| {m} | " + " | ".join(vals) + " |")
    lines.append("")
    return "\n".join(lines)


def _per_seed(rows: list[dict[str, Any]], key: str, method: str, skews: list[float],
              scale: float = 1.0) -> list[np.ndarray]:
    """Per skew, `key` of `method` in every seed (times `scale`), blanks left out."""
    return [scale * np.asarray([r[key] for r in rows if r["method"] == method
                                and r["skew"] == s and r[key] != ""], dtype=np.float64)
            for s in skews]


def _paired_per_seed(rows: list[dict[str, Any]], key: str, a: str, b: str,
                     skews: list[float]) -> list[np.ndarray]:
    """Per skew, method a − method b in points, one value per seed that has both (as
    `paired_difference`)."""
    out = []
    for s in skews:
        by_seed: dict[Any, dict[str, float]] = {}
        for r in rows:
            if r["skew"] == s and r["method"] in (a, b) and r[key] != "":
                by_seed.setdefault(r["seed"], {})[r["method"]] = r[key]
        out.append(np.asarray([100 * (v[a] - v[b]) for _, v in sorted(by_seed.items())
                               if a in v and b in v], dtype=np.float64))
    return out


# One colour per quantity across every panel of the MoE plot (paired differences: black).
MOE_COLOURS = {"local test": "C0", "global test": "C1", "g trained": "C2", "g untrained": "C7",
               "within-client std of g": "C9", "opted-out clients": "C3",
               "participating clients": "C4"}


def _series(ax: Any, skews: list[float], values: list[np.ndarray], color: str, label: str,
            offset: float, log_x: bool) -> None:
    """Mean ± std over seeds (error bars) and every seed (dots, just right of its bar) at each
    skew, shifted sideways by `offset`, a fraction of the skews' range (in octaves on a log
    axis)."""
    base = np.asarray(skews, dtype=np.float64)
    span = float(np.log2(base.max() / base.min()) if log_x else base.max() - base.min()) or 1.0

    def shifted(by: float) -> np.ndarray:
        return base * 2.0 ** (by * span) if log_x else base + by * span

    xs, dots = shifted(offset), shifted(offset + 0.012)
    keep = [i for i, v in enumerate(values) if len(v)]
    if not keep:
        return
    mu = [values[i].mean() for i in keep]
    sd = [values[i].std(ddof=1) if len(values[i]) > 1 else 0.0 for i in keep]
    ax.errorbar(xs[keep], mu, yerr=sd, marker="o", ms=4, capsize=3, color=color, label=label)
    for i in keep:
        ax.scatter(np.full(len(values[i]), dots[i]), values[i], s=12, color=color, alpha=0.6,
                   linewidths=0, zorder=3)


def moe_plot(path: Path, rows: list[dict[str, Any]], skew_name: str, title: str) -> None:
    """Small multiples, mean ± std over seeds with every seed a dot. Row 1: one panel per
    method (local and global test accuracy) and the mixture's gate (trained vs untrained).
    Row 2, when some evaluation clients opted out of FedAvg: per method, the local test
    accuracy of the opted-out vs the participating clients. Row 3, with more than one seed:
    the paired per-seed differences (`PAIRED_DIFFERENCES`), each on its own scale, and the
    gate's within-client std on its own scale. Each row's legend sits right of the row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(r["method"] for r in rows))
    skews = sorted({r["skew"] for r in rows})
    log_x = skew_name == "alpha"
    has_gate = any(r["gate_local"] != "" for r in rows)
    has_within = any(r["gate_within_std"] != "" for r in rows)
    opted = any(r["opted_out_eval_clients"] for r in rows)
    paired = [d for d in PAIRED_DIFFERENCES if d[0] in methods and d[1] in methods]
    paired = paired if len({r["seed"] for r in rows}) > 1 else []

    def accuracy(ax, m):
        for key, label, off in (("local_acc", "local test", -0.02),
                                ("global_acc", "global test", 0.02)):
            _series(ax, skews, _per_seed(rows, key, m, skews, 100), MOE_COLOURS[label], label,
                    off, log_x)
        ax.set(title=m, ylim=(0, 100))

    def gate(ax):
        for key, label, off in (("gate_local", "g trained", -0.02),
                                ("gate_init", "g untrained", 0.02)):
            _series(ax, skews, _per_seed(rows, key, "mixture", skews), MOE_COLOURS[label],
                    label, off, log_x)
        ax.set(title="mixture gate g (local test)", ylim=(0, 1.05), ylabel="g")

    def groups(ax, m):
        for who, label, off in (("opted_out", "opted-out clients", -0.02),
                                ("participating", "participating clients", 0.02)):
            _series(ax, skews, _per_seed(rows, f"local_acc_{who}", m, skews, 100),
                    MOE_COLOURS[label], label, off, log_x)
        ax.set(title=f"{m}: local test by group")

    def difference(ax, a, b, key, label):
        _series(ax, skews, _paired_per_seed(rows, key, a, b, skews), "k",
                "paired difference", 0.0, log_x)
        ax.axhline(0, color="0.5", lw=0.8)
        ax.set(title=label, ylabel="points")

    def within(ax):
        _series(ax, skews, _per_seed(rows, "gate_within_std", "mixture", skews),
                MOE_COLOURS["within-client std of g"], "within-client std of g", 0.0, log_x)
        ax.set(title="within-client std of g", ylim=(0, None), ylabel="std of g")

    grid: list[list[tuple[Any, str]]] = [
        [(lambda ax, m=m: accuracy(ax, m), "accuracy (%)") for m in methods]
        + ([(gate, "")] if has_gate else [])]
    if opted:
        grid.append([(lambda ax, m=m: groups(ax, m), "local test accuracy (%)")
                     for m in methods])
    if paired:
        grid.append([(lambda ax, d=d: difference(ax, *d[:3], d[3]), "a − b (points)")
                     for d in paired])
    if has_within:
        grid[-1].append((within, ""))
    cols = max(len(r) for r in grid)
    fig, axes = plt.subplots(len(grid), cols + 1, figsize=(2.9 * cols + 2.2, 2.9 * len(grid)),
                             squeeze=False, gridspec_kw={"width_ratios": [1] * cols + [0.55]})
    for r, panels in enumerate(grid):
        seen: dict[str, Any] = {}
        for c, (draw, ylabel) in enumerate(panels):
            ax = axes[r][c]
            draw(ax)
            ax.title.set_fontsize(9)
            ax.grid(alpha=0.3)
            ax.set_xlabel(skew_name)
            if log_x:
                ax.set_xscale("log")
            if ylabel and (c == 0 or ylabel != panels[c - 1][1]):
                ax.set_ylabel(ylabel)
            for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
                seen.setdefault(lab, h)
        if opted and r == 1:  # the two groups on one scale, so that they compare across methods
            lo = min(axes[r][c].get_ylim()[0] for c in range(len(panels)))
            hi = max(axes[r][c].get_ylim()[1] for c in range(len(panels)))
            for c in range(len(panels)):
                axes[r][c].set_ylim(lo, hi)
        for ax in axes[r][len(panels):cols]:
            ax.set_visible(False)
        axes[r][-1].axis("off")
        if "paired difference" in seen:
            seen["paired difference"] = plt.Line2D([], [], color="k", marker="o", ms=4)
            seen = {"a − b, same seed" if k == "paired difference" else k: v
                    for k, v in seen.items()}
        axes[r][-1].legend(list(seen.values()), list(seen), loc="center left", fontsize=8,
                           frameon=False)
    fig.suptitle(f"{title}\nmean ± std over seeds (error bars), one dot per seed", fontsize=10)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=110)


def write_moe(out_dir: Path, cells: list[dict[str, Any]], cfg: Any, command: str,
              wall_s: float) -> None:
    rows = moe_rows(cells)
    skew_name = "p" if cfg.partition == "majority" else "alpha"
    moe_plot(out_dir / "plot.png", rows, skew_name, f"{cfg.name}: {cfg.task}, {cfg.model}")
    write_results(out_dir, rows, moe_table(rows, skew_name), cfg, command, wall_s, cells,
                  cells_done=len(cells))
