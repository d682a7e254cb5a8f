"""`sweep --vectorize` vs the same sweep's cells one after another, end to end, in one run.

    PYTHONPATH=. nice -n 19 python benchmarks/vectorized_sweep.py \
        --data-dir ../shared/data --out benchmarks/results/vectorized-sweep-cpu

Paper 1's client sweep (C = 1, 2, 4, 8, 16, 32; IID shards of one training subset, all clients
every round, one local epoch, Adam) x seeds, on the tiny preset. The preset is written to
OUT/preset.yaml; both arms are the real CLI in a fresh process and a fresh sweep folder:
`fedjax-lm sweep` (each cell its own `train` process: what a sweep does today) and
`fedjax-lm sweep --vectorize`. Wall time includes everything (imports, data, compiles, eval,
checkpoints, reports). Afterwards each cell's final.json of the two arms are compared
(accuracy, losses, bitwise-equal parameters). Writes OUT/vectorized_sweep.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml


def preset(args: argparse.Namespace) -> dict:
    return {
        "name": "paper1_tiny_clients",
        "base": {
            "model": "preset:tiny", "task": args.task, "max_train_examples": 512,
            "max_test_examples": 256, "max_length": 64, "batch_size": 16, "local_epochs": 1,
            "rounds": args.rounds, "client_optimizer": "adam", "lr": 1.0e-4, "partition": "iid",
            "server_optimizer": "fedavg", "checkpoint_every": 1,
            **({"data_dir": args.data_dir} if args.data_dir else {}),
        },
        "sweep": {"clients": [1, 2, 4, 8, 16, 32], "seed": list(range(args.seeds))},
    }


def run_arm(name: str, cmd: list[str], log: Path) -> float:
    print(f"{name}: {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    with log.open("w") as f:
        subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT,
                       env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    wall = time.perf_counter() - t0
    print(f"{name}: {wall:.1f} s", flush=True)
    return wall


def compare(a: Path, b: Path) -> dict:
    """Per cell: |final accuracy / eval loss / train loss| differences, equal params."""
    diffs = {"final_accuracy": 0.0, "final_eval_loss": 0.0, "final_train_loss": 0.0}
    same, cells = 0, 0
    for final in sorted(a.glob("*/final.json")):
        x = json.loads(final.read_text())
        y = json.loads((b / final.parent.name / "final.json").read_text())
        cells += 1
        same += x["params_sha256"] == y["params_sha256"]
        for k in diffs:
            diffs[k] = max(diffs[k], abs(x[k] - y[k]))
    return {"cells": cells, "bitwise_equal_params": same, "max_abs_diff": diffs}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--data-dir", help="../shared/data: IMDB (else the synthetic task)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--work", type=Path, help="sweep folders (default OUT/runs; not results)")
    args = p.parse_args()
    args.task = "imdb" if args.data_dir else "synthetic"
    args.out.mkdir(parents=True, exist_ok=True)
    spec = args.out / "preset.yaml"
    spec.write_text(yaml.safe_dump(preset(args), sort_keys=False))
    work = args.work or args.out / "runs"
    shutil.rmtree(work, ignore_errors=True)
    base = [sys.executable, "-m", "fedjax_lm.cli", "sweep", "--config", str(spec),
            "--no-progress"]
    # The vectorized arm runs first: the tokenisation cache it fills favours the baseline.
    arms = {
        "vectorized": base + ["--out-dir", str(work / "vectorized"), "--vectorize"],
        "sequential": base + ["--out-dir", str(work / "sequential")],
    }
    walls = {name: run_arm(name, cmd, args.out / f"{name}.log") for name, cmd in arms.items()}
    check = compare(work / "sequential", work / "vectorized")
    ratio = walls["sequential"] / walls["vectorized"]
    result = {"command": " ".join(sys.argv), "cells": check["cells"], "rounds": args.rounds,
              "task": args.task, "wall_s": walls, "speedup": ratio, "equivalence": check,
              "nproc": os.cpu_count(), "load_avg_at_end": os.getloadavg()}
    (args.out / "vectorized_sweep.json").write_text(json.dumps(result, indent=2) + "\n")
    d = check["max_abs_diff"]
    (args.out / "vectorized_sweep.md").write_text(
        "| arm | wall s |\n|---|---|\n"
        + "".join(f"| {k} | {walls[k]:.1f} |\n" for k in ("sequential", "vectorized"))
        + f"| **speedup** | **{ratio:.2f}x** |\n\n"
        f"{check['cells']} cells, {args.rounds} rounds, task {args.task}; "
        f"bitwise-equal final params in {check['bitwise_equal_params']}/{check['cells']} "
        f"cells; max |diff| final accuracy {d['final_accuracy']:.2e}, eval loss "
        f"{d['final_eval_loss']:.2e}, train loss {d['final_train_loss']:.2e}\n")
    print(f"speedup (sequential / vectorized wall time): {ratio:.2f}x")
    print((args.out / "vectorized_sweep.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
