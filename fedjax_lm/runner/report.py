"""Tables and plots from finished runs: results.csv, summary.md, PNG plots.

Works on any folder of run directories (a sweep's output, or several), so `fedjax-lm
report DIR` can be rerun at any time without touching the runs.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from fedjax_lm.grid import ConfigError
from fedjax_lm.io import (
    DamagedFileError,
    atomic_savefig,
    atomic_write_text,
    read_json,
    read_jsonl,
    read_yaml,
    write_csv,
)
from fedjax_lm.runner.checks import from_dict
from fedjax_lm.runner.config import EXECUTION_FIELDS, RunConfig
from fedjax_lm.runner.evaluation import CLIENT_ACCURACY_FILE, GROUPS

_ALWAYS = ("model", "task", "clients")
# Not columns of the results: where runs live and how they execute, and the seed (a column of
# its own; rows of the summary average over it).
_IGNORED = EXECUTION_FIELDS | {"seed"}


def load_runs(root: Path) -> list[dict[str, Any]]:
    runs = []
    for final_path in sorted(Path(root).glob("**/final.json")):
        # the advice train's own check of a damaged final.json gives, so rerunning works
        fix = "delete it and rerun that run's command: it resumes and writes it again"
        if final_path.parent != Path(root):
            fix += f"; or move {final_path.parent} out of {root}"
        final = read_final(final_path, fix)
        # a run older than a config field ran with that field's default
        final["config"] = {**RunConfig().to_dict(), **final["config"]}
        final["metrics"] = read_jsonl(final_path.parent / "metrics.jsonl")
        final["run_dir"] = str(final_path.parent)
        runs.append(final)
    return runs


def read_final(path: Path, fix: str) -> dict[str, Any]:
    """A run's final.json, or one DamagedFileError line naming it and saying `fix`."""
    final = read_json(path, fix)
    if not isinstance(final, dict) or not isinstance(final.get("config"), dict):
        raise DamagedFileError(f"{path} is damaged (no config mapping in it); {fix}")
    return final


def read_run_config(path: Path, fix: str) -> RunConfig:
    """A run's config.yaml as a validated config, or one line naming the file and `fix`."""
    raw = read_yaml(path, fix)
    if not isinstance(raw, dict):
        raise DamagedFileError(f"{path} is damaged (a {type(raw).__name__}, not a mapping); {fix}")
    try:
        return from_dict(raw)
    except ConfigError as e:
        raise DamagedFileError(f"{path} is damaged ({e}); {fix}") from None


def check_run_files(run_dir: Path) -> RunConfig | None:
    """The config of the earlier run in `run_dir` (None: there is none), after refusing in one
    line naming the file a config.yaml or final.json that cannot be read, before a rerun trips
    over it."""
    cfg = None
    if (run_dir / "config.yaml").is_file():
        cfg = read_run_config(run_dir / "config.yaml",
                              f"restore it, or delete {run_dir} to start the run over")
    if (run_dir / "final.json").is_file():
        read_final(run_dir / "final.json", "delete it and rerun the same command: the run "
                                           "resumes from its last checkpoint and writes it again")
    return cfg


def varying_fields(runs: list[dict]) -> list[str]:
    """Config fields that differ between runs (what the sweep swept), model/task/clients first."""
    keys = [k for k in runs[0]["config"] if k not in _IGNORED]
    varying = [k for k in keys if len({json.dumps(r["config"][k]) for r in runs}) > 1]
    return list(_ALWAYS) + [k for k in varying if k not in _ALWAYS]


def sample_std(values: Any) -> np.ndarray:
    """The seeds' (axis 0) sample std, ddof = 1, and 0 for one seed: tables and error bars
    show the same spread."""
    values = np.asarray(values, dtype=float)
    if len(values) > 1:
        return values.std(axis=0, ddof=1)
    return np.zeros_like(values.mean(axis=0))


def accuracy_curve(run: dict) -> tuple[list[int], list[float]]:
    """(evaluated rounds, test accuracies) of a loaded run (`load_runs`)."""
    pts = [(m["round"], m["eval_accuracy"]) for m in run["metrics"] if "eval_accuracy" in m]
    return [r for r, _ in pts], [a for _, a in pts]


def late_gain(run: dict, back: int = 3) -> float:
    """Accuracy at the last evaluation minus `back` evaluations earlier (NaN if the run has
    fewer): ~0 once a curve has flattened, clearly positive while it still climbs."""
    acc = accuracy_curve(run)[1]
    return acc[-1] - acc[-1 - back] if len(acc) > back else float("nan")


def points_mean_std(fractions: list[float]) -> str:
    """Fractions over seeds as percentage points, `mean ± sample std` to one decimal."""
    v = 100.0 * np.asarray(fractions, dtype=float)
    return f"{v.mean():.1f} ± {float(sample_std(v)):.1f}"


def _mean_std(values: list[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{np.mean(values):.4f} ± {sample_std(values):.4f}"


def _group(runs: list[dict], fields: list[str]) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in runs:
        groups[tuple(r["config"][f] for f in fields)].append(r)
    return dict(sorted(groups.items(), key=lambda kv: tuple(map(_sort_key, kv[0]))))


def _sort_key(value: Any) -> tuple:
    """Numbers in numeric order (clients 1, 4, 16 — not 1, 16, 4), then strings."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return (0, value, "")
    return (1, 0, str(value))


def write_report(root: Path, *, title: str = "", sweep_wall_s: float | None = None) -> Path:
    """Write results.csv, summary.md and plots into `root`; returns summary.md's path."""
    root = Path(root)
    if not root.is_dir():
        what = "is a file" if root.exists() else "does not exist"
        raise FileNotFoundError(f"{root} {what}; name a sweep's or a run's folder")
    runs = load_runs(root)
    if not runs:
        raise FileNotFoundError(f"no finished runs (final.json) under {root}")
    fields = varying_fields(runs)
    columns = fields + ["seed", "final_accuracy", "best_accuracy", "rounds_to_target",
                        "final_eval_loss", "train_wall_s", "skipped_client_updates",
                        "upload_bytes_per_client", "download_bytes_per_client", "run_dir"]
    write_csv(root / "results.csv", [{**{f: r["config"][f] for f in fields + ["seed"]},
                                      **{c: r.get(c) for c in columns[len(fields) + 1:]}}
                                     for r in runs], columns)

    lines = [f"# {title or root.name}", ""]
    total = sum(r["train_wall_s"] + r.get("setup_s", 0.0) for r in runs)
    lines += [f"{len(runs)} runs; total wall time of the runs (setup + rounds, summed over "
              f"every invocation that contributed): {total / 60:.1f} min."]
    if sweep_wall_s is not None:
        lines += [f"Wall time of the last sweep invocation: {sweep_wall_s:.0f} s."]
    lines += [""]
    target = runs[0]["config"].get("target_accuracy")
    header = fields + ["seeds", "final accuracy", "best accuracy",
                       f"rounds to {target:.0%}" if target else "rounds to target",
                       "train s / run"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key, group in _group(runs, fields).items():
        reach = [g["rounds_to_target"] for g in group]
        reach_s = ", ".join("–" if x is None else str(x) for x in reach)
        lines.append("| " + " | ".join(
            [str(k) for k in key]
            + [str(len(group)),
               _mean_std([g["final_accuracy"] for g in group]),
               _mean_std([g["best_accuracy"] for g in group]),
               reach_s,
               f"{np.mean([g['train_wall_s'] for g in group]):.0f}"]) + " |")
    lines += ["", "Plots: `accuracy_vs_round.png`, `final_accuracy_vs_clients.png`."]
    population = [r for r in runs if (Path(r["run_dir"]) / CLIENT_ACCURACY_FILE).is_file()]
    if population:
        lines += _population_lines(population)
    lines += [""]
    summary = root / "summary.md"
    atomic_write_text(summary, "\n".join(lines))
    _plots(root, runs, fields)
    if population:
        _client_accuracy_plot(root / "client_accuracy.png", population)
    return summary


def _population_lines(runs: list[dict]) -> list[str]:
    """The last eval round's per-client accuracy percentiles of runs with `eval_clients`."""
    keys = [f"{g}_client_accuracy_{q}" for g in GROUPS for q in ("p10", "p50", "p90", "worst")]
    header = ["run"] + [k.replace("_client_accuracy_", " ") for k in keys]
    lines = ["", "Per-client accuracy of the sampled clients at the last eval round "
             "(train: on their own training data; heldout: clients never trained on); "
             "distribution in `client_accuracy.png`.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in runs:
        last = next((m for m in reversed(r["metrics"]) if keys[0] in m), {})
        cells = [f"{last[k]:.3f}" if k in last else "–" for k in keys]
        lines.append("| " + " | ".join([Path(r["run_dir"]).name] + cells) + " |")
    return lines


def _client_accuracy_plot(path: Path, runs: list[dict]) -> None:
    """Per run, the empirical distribution (CDF) of the sampled clients' accuracies."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = runs[:8]
    fig, axes = plt.subplots(1, len(shown), figsize=(4.2 * len(shown), 3.4), squeeze=False)
    for ax, r in zip(axes[0], shown, strict=True):
        saved = read_json(Path(r["run_dir"]) / CLIENT_ACCURACY_FILE,
                          "delete it: the next eval round of the run writes it again")
        for group in GROUPS:
            acc = np.sort(np.asarray(saved.get(group, []), dtype=float))
            if len(acc):
                ax.step(acc, np.arange(1, len(acc) + 1) / len(acc), where="post",
                        label=f"{group} ({len(acc)} clients)")
        ax.set(title=f"{Path(r['run_dir']).name} · round {saved.get('round')}",
               xlabel="client accuracy", ylabel="fraction of clients ≤ x", xlim=(-0.02, 1.02))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    _save(fig, path)


class Curve(NamedTuple):
    """Test accuracy by round of one client count, mean and std over its seeds."""

    rounds: list[int]
    mean: np.ndarray
    std: np.ndarray
    seeds: int


def round_panels(runs: list[dict], fields: list[str]) -> dict[str, dict[int, Curve]]:
    """Small multiples for `accuracy_vs_round.png`: one panel per model, task and value of
    every other varying field, holding one curve per client count (seeds averaged)."""
    extra = [f for f in fields if f not in _ALWAYS]
    panels: dict[str, dict[int, Curve]] = {}
    for key, group in _group(runs, ["model", "task"] + extra).items():
        title = " · ".join(map(str, key[:2])) + "".join(
            f"\n{f}={v}" for f, v in zip(extra, key[2:], strict=True))
        curves = {}
        for (clients,), cell in _group(group, ["clients"]).items():
            rows = [[(m["round"], m["eval_accuracy"]) for m in r["metrics"]
                     if "eval_accuracy" in m] for r in cell]
            n = min(len(c) for c in rows)
            ys = np.asarray([[y for _, y in c[:n]] for c in rows], dtype=float)
            curves[clients] = Curve([x for x, _ in rows[0][:n]], ys.mean(axis=0),
                                    sample_std(ys), len(rows))
        panels[title] = curves
    return panels


def qualitative_colours(n: int) -> list:
    """`n` clearly distinct colours (tab10, then tab20 past ten): one per curve, never a
    sequential ramp whose neighbours look alike."""
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
LINESTYLES = ("-", "--", "-.", ":")


def dodge(n: int, width: float = 0.09) -> list[float]:
    """Multiplicative x offsets for `n` lines on a log axis (log2 units of `width` apart), so
    that lines meeting at the same point stay visible side by side."""
    return [2.0 ** (width * (i - (n - 1) / 2)) for i in range(n)]


def _plots(root: Path, runs: list[dict], fields: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    extra = [f for f in fields if f not in _ALWAYS]
    panels = round_panels(runs, fields)
    every_c = sorted({c for curves in panels.values() for c in curves})
    colour = dict(zip(every_c, qualitative_colours(len(every_c)), strict=True))
    tasks = sorted({r["config"]["task"] for r in runs})
    # one column per task (rows: models) when nothing else varies, else four across
    cols = len(tasks) if not extra and 1 < len(tasks) <= 4 else min(4, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.9 * rows + 0.6),
                             squeeze=False, sharex=True, sharey=True)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (title, curves) in zip(axes.flat, panels.items(), strict=False):
        # many curves: faint bands, so that six overlapping ones do not turn into one smear
        band_alpha = 0.2 if len(curves) <= 2 else 0.07
        for c, curve in curves.items():
            ax.plot(curve.rounds, curve.mean, marker="o", ms=2.5, lw=1.3, color=colour[c])
            if curve.seeds > 1:
                ax.fill_between(curve.rounds, curve.mean - curve.std, curve.mean + curve.std,
                                color=colour[c], alpha=band_alpha, linewidth=0)
        ax.set_title(title, fontsize=8)
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    for ax in axes[-1]:
        ax.set_xlabel("round")
    for ax in axes[:, 0]:
        ax.set_ylabel("test accuracy")
    seeds = sorted({curve.seeds for curves in panels.values() for curve in curves.values()})
    handles = [plt.Line2D([], [], color=colour[c], marker="o", ms=3, lw=1.6) for c in every_c]
    fig.legend(handles, [f"C={c}" for c in every_c], loc="upper center", ncol=len(every_c),
               fontsize=8, frameon=False, title=(
                   f"mean over {'/'.join(map(str, seeds))} seed(s); shaded band: ± std"
                   if seeds != [1] else None), title_fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / (2.9 * rows + 0.6)))
    atomic_savefig(fig, root / "accuracy_vs_round.png")
    _final_plot(root / "final_accuracy_vs_clients.png", runs, extra)


def _final_plot(path: Path, runs: list[dict], extra: list[str]) -> None:
    """Final accuracy against C, one panel per task, one line per model and other varying
    fields: each line keeps its colour, marker and dash in every panel, the lines are dodged
    sideways so that equal values stay visible, and the legend sits below the panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = _group(runs, ["task"])
    lines = list(_group(runs, ["model"] + extra))
    labels = {key: ", ".join([str(key[0])] + [f"{f}={v}" for f, v in zip(extra, key[1:],
                                                                            strict=True)])
              for key in lines}
    colours = dict(zip(lines, qualitative_colours(len(lines)), strict=True))
    style = {key: (MARKERS[i % len(MARKERS)], LINESTYLES[i % len(LINESTYLES)])
             for i, key in enumerate(lines)}
    shift = dict(zip(lines, dodge(len(lines)), strict=True))
    width = max(5.5, 5.0 * len(tasks))
    entry_in = 0.6 + 0.065 * max(len(label) for label in labels.values())  # at fontsize 8
    ncol = max(1, min(len(lines), int(width // entry_in)))
    legend_in = 0.2 * -(-len(lines) // ncol) + 0.25
    height = 3.6 + legend_in
    fig, axes = plt.subplots(1, len(tasks), figsize=(width, height), squeeze=False)
    seeded = False
    for ax, ((task,), group) in zip(axes[0], tasks.items(), strict=True):
        for key, cell in _group(group, ["model"] + extra).items():
            by_c = _group(cell, ["clients"])
            cs = [c * shift[key] for (c,) in by_c]
            finals = [[r["final_accuracy"] for r in rs] for rs in by_c.values()]
            seeded |= any(len(f) > 1 for f in finals)
            marker, ls = style[key]
            ax.errorbar(cs, [np.mean(f) for f in finals],
                        yerr=[float(sample_std(f)) for f in finals], marker=marker, ms=6,
                        ls=ls, lw=1.4, mfc="none" if lines.index(key) % 2 else colours[key],
                        mew=1.4, capsize=3, color=colours[key], label=labels[key])
        ax.set(title=task, xlabel="clients", ylabel="final test accuracy", xscale="log")
        ax.set_xticks(sorted({r["config"]["clients"] for r in group}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.grid(alpha=0.3)
    handles, names = axes[0][0].get_legend_handles_labels()
    for ax in axes[0][1:]:
        for h, n in zip(*ax.get_legend_handles_labels(), strict=True):
            if n not in names:
                handles.append(h)
                names.append(n)
    fig.legend(handles, names, loc="lower center", ncol=ncol, fontsize=8, frameon=False,
               title="mean ± std over seeds; lines offset sideways to keep equal values apart"
               if seeded else "lines offset sideways to keep equal values apart",
               title_fontsize=7)
    fig.tight_layout(rect=(0, legend_in / height, 1, 1))
    atomic_savefig(fig, path)


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    atomic_savefig(fig, path)
