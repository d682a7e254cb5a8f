"""Digests that identify a run's inputs and outputs: a model's bytes, and the data a resumed run
must train on again (checked by `rundir` against what the directory recorded)."""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Any

import jax
import numpy as np

from fedjax_lm import models
from fedjax_lm.runner.experiment import Experiment

_HASH_CHUNK = 1 << 24  # bytes hashed at a time: a memory-mapped store is never copied whole


def params_digest(params: Any) -> str:
    """SHA-256 over every parameter's bytes: equal digests mean bitwise-equal models."""
    h = hashlib.sha256()
    for path, leaf in sorted(jax.tree_util.tree_leaves_with_path(params), key=lambda x: str(x[0])):
        h.update(jax.tree_util.keystr(path).encode())
        _update(h, leaf)
    return h.hexdigest()


def _update(h: Any, leaf: Any) -> None:
    """h.update(leaf's bytes), in row chunks for large arrays (the same digest as whole)."""
    arr = np.asarray(leaf)
    if arr.nbytes <= _HASH_CHUNK or arr.ndim == 0:
        h.update(arr.tobytes())
        return
    rows = max(1, _HASH_CHUNK // max(1, arr[0].nbytes))
    for start in range(0, len(arr), rows):
        h.update(np.ascontiguousarray(arr[start:start + rows]).tobytes())


def weights_identity(model: str) -> dict[str, Any] | None:
    """{"model", "weights_sha256"} of the weight files `model` names (read through once per
    process and file version), or None for a random init or weights not on disk."""
    files = models.weights_files(model)
    if not files:
        return None
    h = hashlib.sha256()
    for path in files:
        stat = path.stat()
        h.update(_file_sha256(path, stat.st_size, stat.st_mtime_ns).encode())
    return {"model": model, "weights_sha256": h.hexdigest()}


@functools.lru_cache(maxsize=64)
def _file_sha256(path: Path, size: int, mtime_ns: int) -> str:
    """A file's SHA-256 (size and mtime key the cache: a rewritten file is read again)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def partition_digest(*indices: Any) -> str:
    """`params_digest([list(a), list(b), ...])` of client index arrays, without building the
    per-client list (10^6 clients): the same digest resumed runs recorded before `ClientIndex`."""
    keyed = []
    for i, index in enumerate(indices):
        for c in range(len(index)):
            path = (jax.tree_util.SequenceKey(i), jax.tree_util.SequenceKey(c))
            keyed.append((str(path), jax.tree_util.keystr(path), i, c))
    keyed.sort(key=lambda x: x[0])
    h = hashlib.sha256()
    for _, key, i, c in keyed:
        h.update(key.encode())
        h.update(np.asarray(indices[i][c]).tobytes())
    return h.hexdigest()


def data_fingerprint(exp: Experiment) -> dict[str, Any]:
    """What a resumed run must train on again: the tokenised splits and the partition."""
    out = {
        "train_examples": int(len(exp.train["label"])),
        "test_examples": int(len(exp.test["label"])),
        "num_classes": exp.num_classes,
        "train_sha256": params_digest(exp.train),
        "test_sha256": params_digest(exp.test),
        "partition_sha256": partition_digest(exp.partition, exp.test_shards),
        "source": exp.source,
    }
    if exp.heldout is not None:
        out["heldout_sha256"] = partition_digest(exp.heldout)
    return out
