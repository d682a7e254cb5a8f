"""Cache entries (tokenised arrays, decoded images): written atomically, verified when read.

Two forms: a .npz file (decoded images) and a memory-mapped store, a folder of .npy files with
its content fingerprint (tokenised splits: the population store, see `open_store`).

An entry outlives the run that wrote it, and a full disk, a copy cut short or a crash on a file
system without atomic rename can leave it damaged. An entry that does not load whole (the .npz
zip members carry CRC-32 checksums, so reading every array verifies it) is named in one warning,
removed and rebuilt: never trusted, and never a failure of every later run.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from fedjax_lm.interrupts import critical_section
from fedjax_lm.io import atomic_write

log = logging.getLogger(__name__)

Check = Callable[[dict[str, np.ndarray]], str | None]


def save_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write `arrays` as one .npz entry (temp file, fsync, rename)."""
    atomic_write(path, lambda f: np.savez(f, **arrays))


def load_arrays(path: Path, check: Check | None = None) -> dict[str, np.ndarray] | None:
    """The arrays of entry `path`; None when it is absent or damaged (then it is removed).

    `check` returns what is wrong with arrays that loaded (wrong keys or shapes), else None.
    """
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        problem = check(arrays) if check is not None else None
    except Exception as e:  # BadZipFile, bad CRC-32, EOFError, ValueError, OSError, zlib.error
        problem = f"{type(e).__name__}: {' '.join(str(e).split())}"
    if problem is None:
        return arrays
    log.warning("cache entry %s is damaged (%s); removed, rebuilding it", path, problem)
    path.unlink(missing_ok=True)
    return None


# -- memory-mapped stores: a directory of .npy arrays plus `store.json` (written last) --------
#
# A population of 10^6 clients is too large to load per run: its arrays are written once as
# flat .npy files and memory-mapped read-only, so a run touches only the rows its cohorts use.
# `store.json` records the content fingerprint the arrays were built from; a store whose
# fingerprint differs (another task, tokenizer, max_length or data) is rebuilt, never trusted.

STORE_META = "store.json"


def open_store(
    path: Path, fingerprint: dict[str, Any]
) -> tuple[dict[str, np.ndarray] | None, str | None]:
    """(the arrays, memory-mapped read-only, None), or (None, why the store must be rebuilt);
    the reason is None when there is no store at `path` yet."""
    meta_path = path / STORE_META
    if not meta_path.is_file():
        return None, None
    try:
        meta = json.loads(meta_path.read_text())
        built_for = meta["fingerprint"]
        if built_for != fingerprint:
            return None, _mismatch(built_for, fingerprint)
        arrays = {k: np.load(path / f"{k}.npy", mmap_mode="r") for k in meta["shapes"]}
        found = {k: list(a.shape) for k, a in arrays.items()}
        if found != meta["shapes"]:
            return None, f"it is damaged (shapes {found}, recorded {meta['shapes']})"
    except Exception as e:  # unreadable json, a missing or truncated .npy
        return None, f"it is damaged ({type(e).__name__}: {' '.join(str(e).split())})"
    return arrays, None


def _mismatch(built_for: Any, wanted: dict[str, Any]) -> str:
    if not isinstance(built_for, dict):
        return "its fingerprint is unreadable"
    diff = [f"{k} {built_for.get(k)!r} (now {wanted.get(k)!r})"
            for k in sorted(set(built_for) | set(wanted)) if built_for.get(k) != wanted.get(k)]
    return "it was built for another " + "; ".join(diff)


def save_store(
    path: Path, fingerprint: dict[str, Any], write: Callable[[Path], None]
) -> dict[str, np.ndarray]:
    """Build a store: `write(tmp)` fills a temp folder beside `path` with .npy files; then
    `store.json` is written, every file fsynced, and the folder renamed into place (an old store
    is moved aside first and removed). Returns the new store's arrays, memory-mapped."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        write(tmp)
        shapes = {f.stem: list(np.load(f, mmap_mode="r").shape) for f in sorted(tmp.glob("*.npy"))}
        (tmp / STORE_META).write_text(json.dumps({"fingerprint": fingerprint,
                                                  "shapes": shapes}, indent=1))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        os.chmod(tmp, 0o755)
        with critical_section():
            old = None
            if path.exists():
                old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old."))
                os.replace(path, old / "store")
            os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    arrays, why = open_store(path, fingerprint)
    if arrays is None:
        raise OSError(f"the store just written to {path} does not read back: {why}")
    return arrays
