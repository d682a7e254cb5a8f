"""Tabulate engine v1 vs v2 from `run.sh`'s bench.json files: per cell, each version's best
steady round over both repetitions, and v2 / v1 (above 1: v2 slower)."""

import json
import sys
from collections import defaultdict
from pathlib import Path

out = Path(sys.argv[1])
best: dict[tuple, dict[str, float]] = defaultdict(dict)
for path in sorted(out.glob("v[12]-*/bench.json")):
    version = path.parent.name.split("-")[0]
    for row in json.loads(path.read_text())["rows"]:
        if row.get("status") != "ok":
            continue
        cell = (row["model"], row["clients"], row["label"])
        best[cell][version] = min(best[cell].get(version, float("inf")), row["round_s"])
lines = ["| model | C | backend | v1 round (s) | v2 round (s) | v2 / v1 |",
         "|---|---|---|---|---|---|"]
for (model, clients, label), t in sorted(best.items()):
    ratio = t["v2"] / t["v1"] if {"v1", "v2"} <= set(t) else float("nan")
    lines.append(f"| {model} | {clients} | {label} | {t.get('v1', float('nan')):.4f} | "
                 f"{t.get('v2', float('nan')):.4f} | {ratio:.3f} |")
table = "\n".join(lines) + "\n"
(out / "table.md").write_text(table)
print(table)
