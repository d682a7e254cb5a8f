"""Cache entries (tokenised arrays, decoded images): written atomically, verified when read.

An entry outlives the run that wrote it, and a full disk, a copy cut short or a crash on a file
system without atomic rename can leave it damaged. An entry that does not load whole (the .npz
zip members carry CRC-32 checksums, so reading every array verifies it) is named in one warning,
removed and rebuilt: never trusted, and never a failure of every later run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np

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
