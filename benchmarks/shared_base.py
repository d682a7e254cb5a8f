"""What sharing the frozen base saves a vectorized PEFT sweep: XLA's compiled bytes of one
program of F federations with the base held once (`FederationRound(shared=...)`, the default)
against a copy per federation, for the same cells. Compile only (no round runs).

    PYTHONPATH=. nice -n 19 python benchmarks/shared_base.py --data-dir ../shared/data \
        --out benchmarks/results/shared-base

Cells: `experiments/peft_text.yaml`'s grid (IID and Dirichlet x 3 seeds: F = 6) on SST-2,
C = 8, length 48, LoRA R = 8 on query,value (FedIT and FFA) and BitFit.
Writes OUT/shared_base.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path

import jax

from fedjax_lm.federated.trainable import count
from fedjax_lm.runner import vectorized
from fedjax_lm.runner.presets import VectorizeOptions, load_preset
from fedjax_lm.runner.sweep import expand
from fedjax_lm.scale.memory import format_bytes

METHODS = {
    "lora_fedit": {"peft": "lora", "lora_aggregation": "fedit"},
    "lora_ffa": {"peft": "lora", "lora_aggregation": "ffa"},
    "bitfit": {"peft": "bitfit"},
}


def measure(data_dir: str, overrides: dict) -> dict:
    preset = load_preset("experiments/peft_text.yaml")
    with tempfile.TemporaryDirectory() as tmp:
        cells = expand(preset, {"data_dir": data_dir, "max_length": 48, **overrides}, Path(tmp))
        (group,), _ = vectorized.plan(cells, VectorizeOptions(enabled=True))
        shared = vectorized.planned_shared(group)
        row = {"federations": len(group.cells),
               "shared_bytes_per_copy": count(shared, group.exps[0].params)[0]}
        row["shared_bytes"] = vectorized.compile_group(group).need
        planned = vectorized.planned_shared
        vectorized.planned_shared = lambda _group: None  # the same program, a copy each
        try:
            row["per_federation_bytes"] = vectorized.compile_group(group).need
        finally:
            vectorized.planned_shared = planned
    row["saved_bytes"] = row["per_federation_bytes"] - row["shared_bytes"]
    row["saved_over_copies"] = row["saved_bytes"] / (
        (row["federations"] - 1) * row["shared_bytes_per_copy"])
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    rows = {}
    for name, overrides in METHODS.items():
        rows[name] = measure(args.data_dir, overrides)
        print(name, rows[name], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"jax": jax.__version__, "backend": jax.default_backend(),
            "machine": platform.processor() or platform.machine()}
    (args.out / "shared_base.json").write_text(json.dumps({"meta": meta, "rows": rows},
                                                          indent=2) + "\n")
    lines = ["# A vectorized PEFT program's compiled bytes: frozen base once vs per federation",
             "", f"{meta}; SST-2, C = 8, length 48, peft_text.yaml's 6 federations.", "",
             "| method | F | shared leaves (one copy) | per federation | shared | saved | "
             "saved / ((F - 1) x copy) |", "|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['federations']} | {format_bytes(r['shared_bytes_per_copy'])}"
                     f" | {format_bytes(r['per_federation_bytes'])} | "
                     f"{format_bytes(r['shared_bytes'])} | {format_bytes(r['saved_bytes'])} | "
                     f"{r['saved_over_copies']:.2f} |")
    (args.out / "shared_base.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
