"""bench.json, report.md and the plot, each written atomically (tmp file + rename), so a
half-written result never replaces a good one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedjax_lm.io import atomic_savefig, atomic_write_text


def write_outputs(result: dict[str, Any], out: Path) -> None:
    out = Path(out)
    result["targets"] = evaluate_targets(
        result["rows"], accelerator=result["machine"].get("jax_backend", "cpu") != "cpu")
    atomic_write_text(out / "bench.json", json.dumps(result, indent=1, default=float) + "\n")
    plot = "bench.png"
    try:
        atomic_savefig(_plot(result["rows"]), out / plot, dpi=90)
    except Exception as e:  # noqa: BLE001 — a plot failure must not lose the numbers
        plot = f"(plot failed: {type(e).__name__}: {e})"
    atomic_write_text(out / "report.md", render_markdown(result, plot))


def _ok(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r.get("status") == "ok"]


def _find(rows, model: str, clients: int, label: str) -> dict[str, Any] | None:
    """The cell's row; for a peer swept over settings, its fastest setting."""
    cands = [r for r in _ok(rows) if (r["model"], r["clients"], r["label"]) == (model, clients,
                                                                                label)]
    return min(cands, key=lambda r: r["round_s"]) if cands else None


def _peer_tag(row: dict[str, Any]) -> str:
    """`peer:flower [actors=2,threads=1]`; a backend's label as it is."""
    setting = row.get("peer_setting")
    return row["label"] + (f" [{setting}]" if setting else "")


def _best_vector(rows, model: str, clients: int) -> dict[str, Any] | None:
    cands = [r for r in _ok(rows) if r["model"] == model and r["clients"] == clients
             and r["label"] != "loop" and not r["label"].startswith("peer:")]
    return min(cands, key=lambda r: r["round_s"]) if cands else None


def _best_ours(rows, model: str, clients: int) -> dict[str, Any] | None:
    """Our fastest backend in the cell, the loop backend included."""
    cands = [r for r in _ok(rows) if r["model"] == model and r["clients"] == clients
             and not r["label"].startswith("peer:")]
    return min(cands, key=lambda r: r["round_s"]) if cands else None


def evaluate_targets(rows: list[dict[str, Any]], accelerator: bool = False
                     ) -> list[dict[str, Any]]:
    """The issue's targets, each met / missed / not measured, with the numbers behind it; on an
    accelerator also its own targets (≥ 10× the loop at C = 32, ≥ 40 % bf16 MFU at base size)
    and the largest unchunked base-size C that fit."""
    out: list[dict[str, Any]] = []

    def add(name: str, value: float | None, goal: float, detail: str) -> None:
        status = "not measured" if value is None else ("met" if value >= goal else "missed")
        out.append({"target": name, "value": value, "goal": goal, "status": status,
                    "detail": detail})

    ok = _ok(rows)
    vec = [r for r in ok if r["label"] not in ("loop",) and not r["label"].startswith("peer:")
           and "speedup_vs_loop" in r]
    # Per (model, C) cell, the engine at its best chunking for that cell (chunk width is one of
    # its options); plain unchunked vmap is reported beside it so nothing is hidden.
    cells = sorted({(r["model"], r["clients"]) for r in vec})
    best_per_cell = [max((r for r in vec if (r["model"], r["clients"]) == c),
                         key=lambda r: r["speedup_vs_loop"]) for c in cells]
    worst = min(best_per_cell, key=lambda r: r["speedup_vs_loop"]) if best_per_cell else None
    add("vectorized >= 1.0x loop in every cell (best backend / chunking per cell)",
        worst["speedup_vs_loop"] if worst else None, 1.0,
        f"worst cell: {worst['model']} C={worst['clients']}, best there {worst['label']}"
        if worst else "")
    plain = [r for r in vec if r["label"] == "vmap"]
    worst_plain = min(plain, key=lambda r: r["speedup_vs_loop"]) if plain else None
    add("plain vmap (all clients in one program, unchunked) >= 1.0x loop in every cell",
        worst_plain["speedup_vs_loop"] if worst_plain else None, 1.0,
        f"worst: {worst_plain['model']} C={worst_plain['clients']}" if worst_plain else "")
    tiny = [r for r in vec if r["model"] == "tiny" and r["clients"] >= 8]
    best_tiny = max(tiny, key=lambda r: r["speedup_vs_loop"]) if tiny else None
    add(">= 3x loop where dispatch-bound (tiny, C >= 8, best backend)",
        best_tiny["speedup_vs_loop"] if best_tiny else None, 3.0,
        f"best: {best_tiny['label']} C={best_tiny['clients']}" if best_tiny else "")
    for model, clients, peer, goal in (("tiny", 32, "flower", 5.0), ("mini", 8, "flower", 1.3),
                                       ("mini", 8, "torch-loop", 1.3), ("tiny", 32, "pfl", 1.0),
                                       ("mini", 8, "pfl", 1.0), ("tiny", 32, "torch-loop", 1.0)):
        ours, theirs = _best_vector(rows, model, clients), _find(rows, model, clients,
                                                                 f"peer:{peer}")
        value = theirs["round_s"] / ours["round_s"] if ours and theirs else None
        add(f">= {goal}x faster per round than {peer} ({model}, C={clients})", value, goal,
            f"ours {ours['label']} {ours['round_s']:.3f}s vs {theirs['round_s']:.3f}s "
            f"({_peer_tag(theirs)}, its best setting)" if ours and theirs
            else "peer or our cell missing")
    mini = [r for r in ok if r["model"] == "mini" and not r["label"].startswith("peer:")]
    best = max(mini, key=lambda r: r.get("roofline_fraction") or 0) if mini else None
    add(">= 70% of the matmul roofline (mini)", best["roofline_fraction"] if best else None, 0.7,
        f"best: {best['label']} C={best['clients']} {best['flops_per_s'] / 1e9:.1f} GFLOP/s of "
        f"{best['roofline_flops_per_s'] / 1e9:.1f}" if best else "")
    for model in sorted({r["model"] for r in ok}):
        chunked = [r for r in ok if r["model"] == model and r.get("chunk_executor") == "host"]
        if len({r["clients"] for r in chunked}) >= 6:
            execs = max(r.get("step_executables") or 0 for r in chunked)
            out.append({"target": f"client step compiles <= 2 over the client sweep ({model}, "
                        f"{chunked[0]['label']})", "value": execs, "goal": 2,
                        "status": "met" if execs <= 2 else "missed",
                        "detail": f"{len(chunked)} client counts; all XLA compiles in the "
                        f"sweep: {sum(r['compiles'] for r in chunked)}"})
    if accelerator:
        out += _accelerator_targets(rows, vec)
    steady = [r for r in ok if r.get("steady_compiles")]
    out.append({"target": "never recompiles across rounds", "value": len(steady), "goal": 0,
                "status": "met" if not steady else "missed",
                "detail": ", ".join(f"{r['model']} {r['label']} C={r['clients']}"
                                    for r in steady) or "0 compiles in every steady round"})
    return out


def _accelerator_targets(rows: list[dict[str, Any]], vec: list[dict[str, Any]]
                         ) -> list[dict[str, Any]]:
    out = []
    for model in ("tiny", "mini"):
        cands = [r for r in vec if r["model"] == model and r["clients"] == 32]
        best = max(cands, key=lambda r: r["speedup_vs_loop"]) if cands else None
        value = best["speedup_vs_loop"] if best else None
        out.append({"target": f">= 10x loop at C=32 ({model}, accelerator)", "value": value,
                    "goal": 10.0, "status": "not measured" if best is None else
                    ("met" if value >= 10.0 else "missed"),
                    "detail": f"best: {best['label']}" if best else "no loop + vector pair"})
    base = [r for r in _ok(rows) if r["model"] == "base" and r["dtype"] == "bfloat16"
            and r.get("roofline_fraction")]
    best = max(base, key=lambda r: r["roofline_fraction"]) if base else None
    out.append({"target": ">= 40% bf16 MFU at base size (model FLOPs / measured bf16 matmul "
                "roofline)", "value": best["roofline_fraction"] if best else None, "goal": 0.4,
                "status": "not measured" if best is None else
                ("met" if best["roofline_fraction"] >= 0.4 else "missed"),
                "detail": f"best: {best['label']} C={best['clients']}, "
                f"{best['flops_per_s'] / 1e12:.1f} TFLOP/s" if best else ""})
    unchunked = [r for r in rows if r["model"] == "base" and r["label"] == "vmap"]
    if unchunked:
        fits = [r["clients"] for r in unchunked if r.get("status") == "ok"]
        ooms = [r["clients"] for r in unchunked if r.get("oom")]
        top = max(fits) if fits else None
        row = next((r for r in unchunked if r.get("status") == "ok" and r["clients"] == top),
                   {})
        mem = row.get("peak_mem_bytes")
        bound = "<= " if row.get("peak_mem_kind") == "device_peak_bound" else ""
        out.append({"target": "largest unchunked C that fits (base, vmap; measured, no goal)",
                    "value": top, "goal": "—", "status": "measured",
                    "detail": (f"peak {bound}{mem / 2**30:.1f} GiB at C={top}; " if mem else "")
                    + (f"out of memory at C={min(ooms)}" if ooms else
                       f"no out-of-memory up to C={top}")})
    return out


def _mem_mib(row: dict[str, Any]) -> str:
    """Peak MiB; "≤" where an earlier cell in the process set the device's peak."""
    mem = row.get("peak_mem_bytes")
    if not mem:
        return "—"
    return ("≤ " if row.get("peak_mem_kind") == "device_peak_bound" else "") + f"{mem / 2**20:.0f}"


def _fmt(x: Any, spec: str = ".3f") -> str:
    return "—" if x is None else format(x, spec)


def render_markdown(result: dict[str, Any], plot: str) -> str:
    m = result["machine"]
    la, le = result["loadavg_start"], result["loadavg_end"]
    lines = [
        f"# fedjax_lm bench — {m['hostname']}", "",
        f"- machine: {m['cpu']} × {m['cpu_count']} CPUs; jax {m['jax']} "
        f"({m['jax_backend']}, {m['device_kind']}, {len(m['devices'])} device(s))",
        f"- started {result['started']}, took {result['wall_s'] / 60:.1f} min; load average "
        f"(1/5/15 min) {la[0]:.2f}/{la[1]:.2f}/{la[2]:.2f} at start, "
        f"{le[0]:.2f}/{le[1]:.2f}/{le[2]:.2f} at end — the machine is shared, so higher load "
        "means slower, noisier numbers for every column alike",
        "- dense-matmul roofline (best of 5 (CPU) or 50 (accelerator) jitted square matmuls, "
        "this process, re-measured "
        "before each group; last value): "
        + ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in
                    result["roofline_flops_per_s"].items()),
        f"- round_s is the median of {result['rounds']} steady rounds after the first; "
        "compile_s = first round − round_s; FLOPs are counted from the model "
        "(6·non-embedding weights + attention per token, ×tokens); peers run in .venv-peers; "
        "peak MiB is host RSS on CPU, else the device's peak bytes in use (≤: an earlier cell "
        "in the process set that peak, which JAX cannot reset)",
        "",
        f"![examples/s vs clients]({plot})" if plot.endswith(".png") else plot, "",
        "## Targets", "", "| target | value | goal | status | detail |", "|---|---|---|---|---|",
    ]
    for t in result.get("targets", []):
        lines.append(f"| {t['target']} | {_fmt(t['value'], '.3g')} | {t['goal']} | "
                     f"**{t['status']}** | {t['detail']} |")
    for model in dict.fromkeys(r["model"] for r in result["rows"]):
        rows = [r for r in result["rows"] if r["model"] == model]
        r0 = rows[0]
        lines += ["", f"## {model}: B={r0['batch_size']}, L={r0['max_length']}, "
                  f"S={r0['local_steps']} local steps, {r0['optimizer']}, {r0['dtype']}", "",
                  "| backend | C | round s | compile s | examples/s | tokens/s | GFLOP/s | "
                  "roofline | peak MiB | compiles | × loop | ours/peer round | up MiB/client |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in sorted(rows, key=lambda r: (r["label"], r["clients"], r.get("peer_setting")
                                             or "")):
            if r.get("status") != "ok":
                lines.append(f"| {_peer_tag(r)} | {r['clients']} | failed: {r.get('error')} |"
                             + " |" * 10)
                continue
            ratio = ", ".join(f"{p} {v:.2f}" for p, v in (r.get("peer_round_ratio") or {}
                                                           ).items())
            lines.append(
                f"| {_peer_tag(r)}{' (best)' if r.get('peer_best') else ''} | {r['clients']} | "
                f"{r['round_s']:.3f} | {r['compile_s']:.2f} | "
                f"{r['examples_per_s']:.1f} | {r['tokens_per_s']:.0f} | "
                f"{r['flops_per_s'] / 1e9:.1f} | {_fmt(r.get('roofline_fraction'), '.0%')} | "
                f"{_mem_mib(r)} | {_fmt(r.get('compiles'), 'd')} |"
                f" {_fmt(r.get('speedup_vs_loop'), '.2f')} | {ratio} | "
                f"{_fmt((r.get('upload_bytes_per_client') or 0) / 2**20 or None, '.3g')} |")
    lines += _peer_sweep_section(result["rows"])
    lines += _trace_section(result["rows"])
    failed = [r for r in result["rows"] if r.get("status") != "ok"]
    if failed:
        lines += ["", "## Failures", ""]
        for r in failed:
            lines += [f"- {r['model']} {_peer_tag(r)} C={r['clients']}: {r.get('error')}"]
            if r.get("stderr_tail"):
                lines += ["", "```", r["stderr_tail"], "```", ""]
    return "\n".join(lines) + "\n"


def _peer_sweep_section(rows: list[dict[str, Any]]) -> list[str]:
    """Each peer's settings sweep per cell, and our best round against the peer's best."""
    swept = [r for r in _ok(rows) if r.get("peer_setting")]
    if not swept:
        return []
    lines = ["", "## The peers at their best (settings sweep)", "",
             "Each peer ran every setting of its sweep (Flower: Ray actors × torch threads per "
             "actor; pfl-research and the PyTorch loop: torch threads); the comparison uses its "
             "fastest. × best = the setting's round time over the peer's best; ours/best = our "
             "fastest backend's round (the loop backend included) over the peer's best (below "
             "1: we are faster).", "",
             "| model | C | peer | setting | round s | × best | ours (best backend) | "
             "ours/best |", "|---|---|---|---|---|---|---|---|"]
    cells = dict.fromkeys((r["model"], r["clients"], r["label"]) for r in swept)
    for model, clients, label in cells:
        group = sorted((r for r in swept if (r["model"], r["clients"], r["label"])
                        == (model, clients, label)), key=lambda r: r["round_s"])
        best, ours = group[0], _best_ours(rows, model, clients)
        for r in group:
            mark = "**" if r is best else ""
            ours_txt = (f"{ours['label']} {ours['round_s']:.3f} s" if ours and r is best
                        else "")
            ratio = f"{ours['round_s'] / best['round_s']:.3f}" if ours and r is best else ""
            lines.append(f"| {model} | {clients} | {label[5:]} | {mark}{r['peer_setting']}{mark}"
                         f" | {r['round_s']:.3f} | {r['round_s'] / best['round_s']:.2f} | "
                         f"{ours_txt} | {ratio} |")
    return lines


def _trace_section(rows: list[dict[str, Any]]) -> list[str]:
    """Traced cells: device time per round by kernel kind, and each cell's top kernels."""
    traced = [r for r in _ok(rows) if r.get("trace", {}).get("kinds_s_per_round")]
    if not traced:
        return []
    kinds = list(dict.fromkeys(k for r in traced for k in r["trace"]["kinds_s_per_round"]))
    lines = ["", "## Where the time goes (profiled rounds, `--trace`)", "",
             "Kernel time per round by kind (ms; kinds by kernel name, see "
             "`fedjax_lm/bench/trace.py`); busy = summed kernel time ÷ wall time (below 100 %: "
             "the device waits on the host).", "",
             "| model | backend | C | wall ms | busy | " + " | ".join(kinds) + " |",
             "|---|---|---|---|---|" + "---|" * len(kinds)]
    for r in traced:
        t = r["trace"]
        lines.append(f"| {r['model']} | {r['label']} | {r['clients']} | "
                     f"{1e3 * t['wall_s_per_round']:.1f} | {_fmt(t['busy_fraction'], '.0%')} | "
                     + " | ".join(f"{1e3 * t['kinds_s_per_round'].get(k, 0.0):.1f}"
                                  for k in kinds) + " |")
    for r in traced:
        top = r["trace"]["top_kernels"][:6]
        lines += ["", f"- {r['model']} {r['label']} C={r['clients']}: " + "; ".join(
            f"`{k['name'][:60]}` {1e3 * k['s_per_round']:.1f} ms ({k['kind']})" for k in top)]
    return lines


def _plot(rows: list[dict[str, Any]]) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # A swept peer is drawn at its best setting only.
    ok = [r for r in _ok(rows) if not r.get("peer_setting") or r.get("peer_best")]
    models = list(dict.fromkeys(r["model"] for r in ok)) or ["(none)"]
    fig, axes = plt.subplots(2, len(models), figsize=(6 * len(models), 8), squeeze=False)
    for j, model in enumerate(models):
        mrows = [r for r in ok if r["model"] == model]
        for label in dict.fromkeys(r["label"] for r in mrows):
            pts = sorted((r["clients"], r["examples_per_s"], r.get("speedup_vs_loop"))
                         for r in mrows if r["label"] == label)
            style = "--o" if label.startswith("peer:") else "-o"
            axes[0, j].plot([p[0] for p in pts], [p[1] for p in pts], style, label=label)
            sp = [(p[0], p[2]) for p in pts if p[2] is not None]
            if sp:
                axes[1, j].plot([p[0] for p in sp], [p[1] for p in sp], style, label=label)
        axes[0, j].set(title=f"{model}: examples/s", xscale="log", yscale="log",
                       xlabel="clients per round C")
        axes[1, j].set(title=f"{model}: speed-up over our loop backend", xscale="log",
                       xlabel="clients per round C")
        axes[1, j].axhline(1.0, color="gray", lw=0.8)
        for ax in axes[:, j]:
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
            ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
