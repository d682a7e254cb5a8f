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
        "sweep": {"clients": args.clients, "seed": list(range(args.seeds))},
    }


def run_arms(arms: dict[str, list[str]], out: Path, concurrent: bool) -> dict[str, dict]:
    """Each arm's wall time and CPU time (user + sys of its whole process tree, cells
    included: every process is waited for). `concurrent` starts both at once: on a host
    shared with other work the two then see the same load, and CPU time, which load does not
    stretch, is the comparable measure."""
    path = [str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, path))}
    procs, walls = {}, {}
    for name, cmd in arms.items():
        print(f"{name}: {' '.join(cmd)}", flush=True)
        wrapped = [sys.executable, "-c", CPU_WRAPPER, str(out / f"{_folder(name)}.cpu"), *cmd]
        procs[name] = (time.perf_counter(), subprocess.Popen(
            wrapped, stdout=(out / f"{_folder(name)}.log").open("w"), stderr=subprocess.STDOUT,
            env=env))
        while len(walls) < len(procs) and (not concurrent or len(procs) == len(arms)):
            for other, (t0, proc) in procs.items():  # each arm's wall ends when it exits
                if other not in walls and proc.poll() is not None:
                    walls[other] = time.perf_counter() - t0
            time.sleep(0.05)
    result = {}
    for name, (_, proc) in procs.items():
        if proc.returncode != 0:
            raise SystemExit(f"{name} failed (exit {proc.returncode}); see "
                             f"{out}/{_folder(name)}.log")
        cpu_s = float((out / f"{_folder(name)}.cpu").read_text())
        result[name] = {"wall_s": walls[name], "cpu_s": cpu_s}
        print(f"{name}: {result[name]}", flush=True)
    return result


# Runs argv[2:] and writes the CPU seconds of its whole process tree to argv[1].
CPU_WRAPPER = """
import resource, subprocess, sys
code = subprocess.call(sys.argv[2:])
u = resource.getrusage(resource.RUSAGE_CHILDREN)
open(sys.argv[1], "w").write(str(u.ru_utime + u.ru_stime))
sys.exit(code)
"""


def _folder(arm: str) -> str:
    return arm.replace(" (padding ", "-p").rstrip(")")


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
    p.add_argument("--clients", type=lambda t: [int(c) for c in t.split(",")],
                   default=[1, 2, 4, 8, 16, 32], help="client counts (default 1,2,4,8,16,32)")
    p.add_argument("--work", type=Path, help="sweep folders (default OUT/runs; not results)")
    p.add_argument("--paddings", type=lambda t: [float(x) for x in t.split(",")], default=[1.5],
                   help="one vectorized arm per --vectorize-padding limit (default 1.5; 32 "
                        "puts every client count of the sweep into one program)")
    p.add_argument("--concurrent", action="store_true",
                   help="run both arms at once (a shared host: compare CPU time)")
    args = p.parse_args()
    args.task = "imdb" if args.data_dir else "synthetic"
    args.out.mkdir(parents=True, exist_ok=True)
    spec = args.out / "preset.yaml"
    spec.write_text(yaml.safe_dump(preset(args), sort_keys=False))
    work = args.work or args.out / "runs"
    shutil.rmtree(work, ignore_errors=True)
    base = [sys.executable, "-m", "fedjax_lm.cli", "sweep", "--config", str(spec),
            "--no-progress"]
    # The vectorized arms run first: the tokenisation cache they fill favours the baseline.
    vectorized = {f"vectorized (padding {x:g})": x for x in args.paddings}
    arms = {name: base + ["--out-dir", str(work / _folder(name)), "--vectorize",
                          "--vectorize-padding", str(x)] for name, x in vectorized.items()}
    arms["sequential"] = base + ["--out-dir", str(work / "sequential")]
    load = os.getloadavg()
    times = run_arms(arms, args.out, args.concurrent)
    checks = {name: compare(work / "sequential", work / _folder(name)) for name in vectorized}
    ratios = {name: {k: times["sequential"][k] / times[name][k] for k in ("wall_s", "cpu_s")}
              for name in vectorized}
    result = {"command": " ".join(sys.argv), "cells": len(args.clients) * args.seeds,
              "rounds": args.rounds, "task": args.task, "concurrent": args.concurrent,
              "arms": times, "speedup": ratios, "equivalence": checks, "nproc": os.cpu_count(),
              "load_avg_at_start": load, "load_avg_at_end": os.getloadavg()}
    (args.out / "vectorized_sweep.json").write_text(json.dumps(result, indent=2) + "\n")
    table = ("| arm | wall s | CPU s (process tree) | sequential / arm, wall | CPU | bitwise-equal "
             "params | max abs diff final accuracy / eval loss / train loss |\n"
             "|---|---|---|---|---|---|---|\n"
             f"| sequential | {times['sequential']['wall_s']:.1f} | "
             f"{times['sequential']['cpu_s']:.1f} | 1 | 1 | | |\n")
    for name in vectorized:
        t, r, c = times[name], ratios[name], checks[name]
        d = c["max_abs_diff"]
        table += (f"| {name} | {t['wall_s']:.1f} | {t['cpu_s']:.1f} | **{r['wall_s']:.2f}x** | "
                  f"{r['cpu_s']:.2f}x | {c['bitwise_equal_params']}/{c['cells']} | "
                  f"{d['final_accuracy']:.2e} / {d['final_eval_loss']:.2e} / "
                  f"{d['final_train_loss']:.2e} |\n")
    (args.out / "vectorized_sweep.md").write_text(
        table + f"\nArms run {'concurrently' if args.concurrent else 'one after the other'}; "
        f"load average {load[0]:.1f} at the start, {result['load_avg_at_end'][0]:.1f} at the "
        f"end ({os.cpu_count()} cores). {result['cells']} cells, {args.rounds} rounds, task "
        f"{args.task}.\n")
    for name, r in ratios.items():
        print(f"speedup (sequential / {name}): wall {r['wall_s']:.2f}x, CPU {r['cpu_s']:.2f}x")
    print((args.out / "vectorized_sweep.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
