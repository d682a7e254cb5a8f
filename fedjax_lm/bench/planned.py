"""Planned vs measured device memory: XLA's compiled plan for each bench cell beside its peak.

    python -m fedjax_lm.bench.planned --target h200 --out planned.md \\
        benchmarks/results/gpu-h200-2/bench.json benchmarks/results/gpu-h200-2/largest-c/bench.json

For every vectorized cell whose device peak the bench attributes to that cell (not a bound left
by an earlier one), compiles the cell's chunk program for `--target` — deviceless where the card
is absent (`scale.targets`) — and prints the planned bytes beside the measured peak. That is
the check that `fedjax-lm plan --target` can be trusted for the card. An unchunked cell is
planned as one chunk of all its clients (the same client step; the round adds only the server
step). The measured peak also holds what the bench keeps beside the program: the params it
initialised (one more copy of them) and the round's data.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax

from fedjax_lm.bench.measure import client_optimizer
from fedjax_lm.bench.workload import Workload, encoder_config
from fedjax_lm.io import atomic_write_text
from fedjax_lm.models import Model, classification_loss
from fedjax_lm.scale import memory as mem
from fedjax_lm.scale import targets

OWN_PEAKS = ("device_peak", "device_peak_in_process")


def measured_cells(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Vectorized cells (one compiled client-step program) with a peak of their own."""
    return [r for r in rows if r.get("backend") == "vmap" and not r.get("error")
            and r.get("peak_mem_kind") in OWN_PEAKS and r.get("peak_mem_bytes")]


def planned_bytes(row: dict[str, Any], sharding: Any) -> tuple[int, int]:
    """(compiled bytes of the cell's chunk program, bytes of its params) for `sharding`."""
    w = Workload(row["model"], row["clients"], row["local_steps"], row["batch_size"],
                 row["max_length"], dtype=row["dtype"], attention_impl=row["attention_impl"],
                 remat=row["remat"])
    model = Model(encoder_config(w))
    params = jax.eval_shape(model.init, jax.random.key(0))
    batch = mem.text_batch(w.local_steps, w.batch_size, w.max_length)
    width = row["chunk"] or row["clients"]
    planned = mem.compiled_chunk_bytes(classification_loss(model), params,
                                       client_optimizer(row["optimizer"]), batch, width,
                                       sharding=sharding)
    return planned, mem.tree_bytes(params)


def compare(rows: list[dict[str, Any]], target: targets.CompileTarget) -> list[str]:
    """The markdown table: one line per measured cell."""
    f = mem.format_bytes
    lines = [f"Planned for: {target.name} ({target.description})", "",
             "| model | cell | C | measured peak | planned | measured − planned | "
             "params (one copy) |", "|---|---|---|---|---|---|---|"]
    for row in measured_cells(rows):
        planned, params = planned_bytes(row, target.sharding)
        measured = row["peak_mem_bytes"]
        lines.append(f"| {row['model']} {row['dtype']} {row['optimizer']} | {row['label']} | "
                     f"{row['clients']} | {f(measured)} | {f(planned)} | "
                     f"{f(measured - planned)} ({(measured - planned) / measured:+.1%}) | "
                     f"{f(params)} |")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fedjax_lm.bench.planned", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bench_json", nargs="+", help="bench.json files measured on the card")
    p.add_argument("--target", default="local", help="as `fedjax-lm plan --target`")
    p.add_argument("--out", help="also write the table here")
    args = p.parse_args(argv)
    targets.use_cpu_platform_for(args.target)
    try:
        rows = [r for path in args.bench_json for r in json.loads(Path(path).read_text())["rows"]]
        lines = compare(rows, targets.resolve_target(args.target))
    except (OSError, KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.out:
        atomic_write_text(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
