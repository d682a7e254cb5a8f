"""Per-round metrics: one JSON object per round in metrics.jsonl, mirrored to TensorBoard.

On resume the log is cut back to the checkpointed round, so a resumed run's
metrics.jsonl has each round exactly once.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from fedjax_lm.interrupts import critical_section
from fedjax_lm.io import atomic_write_text, read_jsonl


class MetricsLog:
    def __init__(self, run_dir: Path, resume_round: int, *, enabled: bool = True):
        """`enabled=False` (non-primary processes) keeps records in memory only."""
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        kept = [r for r in read_jsonl(self.path) if r["round"] <= resume_round]
        self.records = kept
        self._tb = None
        if enabled:
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
            from tensorboardX import SummaryWriter

            # purge_step drops events from rounds after the checkpoint (a killed run's tail).
            self._tb = SummaryWriter(str(run_dir / "tb"), purge_step=resume_round + 1)

    def write(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if not self.enabled:
            return
        with critical_section(), self.path.open("a") as f:  # Ctrl-C never tears a line
            f.write(json.dumps(record) + "\n")
            f.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key != "round" and isinstance(value, int | float) and math.isfinite(value):
                    self._tb.add_scalar(key, value, record["round"])
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
