"""Table and plots of the PEFT comparison (experiments/peft_text.yaml and the superseded
peft_sst2.yaml, issue 16).

    python experiments/peft_report.py experiments/results/peft_text

reads every finished run under OUT/runs (the runner's own `load_runs`) and writes OUT/results.csv
(one row per run), OUT/table.md (mean ± sample std over seeds) and OUT/peft.png: final accuracy
per method for each task, partition and client count, and final accuracy against the megabytes each
client uploaded over the whole run (the `upload_bytes_per_client` of every round, summed).
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import numpy as np

from fedjax_lm.io import atomic_savefig, atomic_write_text, write_csv
from fedjax_lm.runner.report import load_runs

METHODS = ["full", "head", "bitfit", "lora_fedit", "lora_ffa", "lora_exact"]
COLUMNS = ["task", "method", "partition", "clients", "seed", "lr", "final_accuracy",
           "best_accuracy", "final_eval_loss", "rounds", "upload_mb_per_client_round",
           "upload_mb_per_client", "train_wall_s", "run_dir"]
MB = 1e6


def method(cfg: dict) -> str:
    """full | head | bitfit | lora_<aggregation> (the LoRA default aggregation is fedit)."""
    peft = cfg.get("peft") or "none"
    if peft == "lora":
        return f"lora_{cfg.get('lora_aggregation') or 'fedit'}"
    return "full" if peft == "none" else peft


def rows(root: Path) -> list[dict]:
    out = []
    for r in load_runs(root / "runs"):
        cfg, ms = r["config"], r["metrics"]
        upload = [m["upload_bytes_per_client"] for m in ms if "upload_bytes_per_client" in m]
        out.append({
            "task": cfg["task"], "method": method(cfg), "partition": cfg["partition"],
            "clients": cfg["clients"],
            "seed": cfg["seed"], "lr": cfg["lr"], "final_accuracy": r["final_accuracy"],
            "best_accuracy": r["best_accuracy"], "final_eval_loss": r.get("final_eval_loss"),
            "rounds": len(upload), "upload_mb_per_client_round": upload[-1] / MB,
            "upload_mb_per_client": sum(upload) / MB,
            "train_wall_s": r["train_wall_s"],
            "run_dir": str(Path(r["run_dir"]).relative_to(root)),
        })
    order = {m: i for i, m in enumerate(METHODS)}
    return sorted(out, key=lambda x: (x["task"], x["clients"], x["partition"],
                                      order[x["method"]], x["seed"]))


def grouped(table: list[dict]) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in table:
        groups[(row["task"], row["clients"], row["partition"], row["method"])].append(row)
    return groups


def mean_std(values: list[float]) -> tuple[float, float]:
    v = np.asarray(values, float)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def markdown(groups: dict[tuple, list[dict]]) -> str:
    lines = ["| task | C | partition | method | seeds | final accuracy | upload MB / client / "
             "round | upload MB / client (run) | accuracy per uploaded MB | train s / run |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for (task, c, part, meth), rs in groups.items():
        m, s = mean_std([r["final_accuracy"] for r in rs])
        mb = rs[0]["upload_mb_per_client"]
        lines.append(f"| {task} | {c} | {part} | {meth} | {len(rs)} | {m:.3f} ± {s:.3f} | "
                     f"{rs[0]['upload_mb_per_client_round']:.3g} | {mb:.3g} | {m / mb:.3g} | "
                     f"{np.mean([r['train_wall_s'] for r in rs]):.0f} |")
    return "\n".join(lines) + "\n"


def plot(path: Path, groups: dict[tuple, list[dict]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({t for t, *_ in groups})
    fig, grid = plt.subplots(len(tasks), 2, figsize=(11, 4.2 * len(tasks)), squeeze=False)
    for task, axes in zip(tasks, grid, strict=True):
        settings = sorted({(c, p) for t, c, p, _ in groups if t == task})
        width = 0.8 / max(len(settings), 1)
        for i, (c, part) in enumerate(settings):
            pts = [(j, *mean_std([r["final_accuracy"] for r in groups[(task, c, part, m)]]))
                   for j, m in enumerate(METHODS) if (task, c, part, m) in groups]
            x, mean, std = map(np.asarray, zip(*pts, strict=True))
            label = f"C={c}, {part}"
            axes[0].errorbar(x + (i - (len(settings) - 1) / 2) * width, mean, yerr=std,
                             fmt="o", capsize=3, label=label)
            mb = [groups[(task, c, part, METHODS[j])][0]["upload_mb_per_client"] for j in x]
            axes[1].errorbar(mb, mean, yerr=std, fmt="o", capsize=3, label=label)
            for j, xm, ym in zip(x, mb, mean, strict=True) if i == 0 else ():
                # staggered: methods of equal upload (fedit, exact) sit on the same point
                axes[1].annotate(METHODS[j], (xm, ym), fontsize=7,
                                 xytext=(4, 4 + 8 * (j % 3)), textcoords="offset points")
        axes[1].margins(x=0.15)
        axes[0].set_xticks(range(len(METHODS)), METHODS, rotation=20)
        axes[0].set(ylabel="final test accuracy (mean ± std over seeds)",
                    title=f"{task}: accuracy per method (equal rounds)")
        axes[1].set(xscale="log", xlabel="MB uploaded per client over the run (log)",
                    ylabel="final test accuracy", title=f"{task}: accuracy vs upload")
        for ax in axes:
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_savefig(fig, path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="the experiment folder (holds runs/)")
    out = p.parse_args().out
    table = rows(out)
    if not table:
        raise SystemExit(f"no finished runs under {out / 'runs'}; run the experiment first")
    write_csv(out / "results.csv", table, COLUMNS)
    groups = grouped(table)
    text = markdown(groups)
    atomic_write_text(out / "table.md", text)
    plot(out / "peft.png", groups)
    print(text, end="")


if __name__ == "__main__":
    main()
