"""Atomic file writes: a reader (or a resumed run) never sees half a file, and Ctrl-C never
leaves one behind (each write is a critical section).

Every layer writes results through here, so it sits at the top of the package and imports
nothing from it but `interrupts`.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import yaml

from fedjax_lm.interrupts import critical_section


def atomic_write(path: str | Path, write: Callable[[BinaryIO], Any]) -> None:
    """`write(f)` into a temp file in the same folder, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with critical_section():
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)  # mkstemp makes 0600; results are meant to be shared
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_savefig(fig: Any, path: str | Path, dpi: int = 110) -> None:
    """Save a matplotlib figure as PNG through `atomic_write_bytes`, then close it."""
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def write_csv(path: str | Path, rows: list[dict], fieldnames: list[str] | None = None) -> None:
    """Rows of dicts as CSV (columns: `fieldnames`, else the first row's keys); no rows and
    no columns write nothing."""
    import csv
    import io

    if not rows and not fieldnames:
        return
    buf = io.StringIO(newline="")
    writer = csv.DictWriter(buf, fieldnames=fieldnames or list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_yaml(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, yaml.safe_dump(obj, sort_keys=False))


def read_jsonl(path: str | Path) -> list[dict]:
    """All complete records; a torn last line (killed mid-write) is ignored."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return records


class DamagedFileError(ValueError):
    """A results file that exists but cannot be parsed; the message names it and the fix."""


def read_json(path: str | Path, fix: str) -> Any:
    """The JSON in `path`, or a one-line DamagedFileError naming it and saying `fix`."""
    return _parse(path, fix, "JSON", json.loads, json.JSONDecodeError)


def read_yaml(path: str | Path, fix: str) -> Any:
    """The YAML in `path`, or a one-line DamagedFileError naming it and saying `fix`."""
    return _parse(path, fix, "YAML", yaml.safe_load, yaml.YAMLError)


def _parse(path: str | Path, fix: str, what: str, parse: Callable[[str], Any],
           error: type[Exception]) -> Any:
    path = Path(path)
    try:
        return parse(path.read_text())
    except (error, UnicodeDecodeError) as e:
        problem = yaml_problem(e) if isinstance(e, yaml.YAMLError) else " ".join(str(e).split())
        raise DamagedFileError(f"{path} is damaged (not valid {what}: {problem}); {fix}") from None


def yaml_problem(e: yaml.YAMLError) -> str:
    """What PyYAML found and where, on one line (its own message spans several)."""
    problem, mark = getattr(e, "problem", None), getattr(e, "problem_mark", None)
    if problem and mark is not None:
        return f"{problem} (line {mark.line + 1}, column {mark.column + 1})"
    return " ".join(str(e).split())
