"""Tabulate engine v1 vs v2 from `run.sh`'s bench.json files: per cell, each repetition's
steady round, each version's best, and v2 / v1 of the bests (above 1: v2 slower)."""

import json
import sys
from collections import defaultdict
from pathlib import Path

out = Path(sys.argv[1])
times: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
for path in sorted(out.glob("v[12]-*-[0-9]/bench.json")):
    version = path.parent.name.split("-")[0]
    for row in json.loads(path.read_text())["rows"]:
        if row.get("status") == "ok":
            times[(row["model"], row["clients"], row["label"])][version].append(row["round_s"])
lines = ["| model | C | backend | v1 rounds (s), by rep | v2 rounds (s), by rep | v2 / v1 (best) |",
         "|---|---|---|---|---|---|"]
for (model, clients, label), t in sorted(times.items()):
    ratio = min(t["v2"]) / min(t["v1"]) if t["v1"] and t["v2"] else float("nan")
    reps = [", ".join(f"{x:.4f}" for x in t[v]) for v in ("v1", "v2")]
    lines.append(f"| {model} | {clients} | {label} | {reps[0]} | {reps[1]} | {ratio:.3f} |")
table = "\n".join(lines) + "\n"
(out / "table.md").write_text(table)
print(table)
