"""Digests that identify a run's inputs and outputs: a model's bytes, and the data a resumed run
must train on again (checked by `rundir` against what the directory recorded)."""

from __future__ import annotations

import hashlib
from typing import Any

import jax
import numpy as np

from fedjax_lm.runner.experiment import Experiment


def params_digest(params: Any) -> str:
    """SHA-256 over every parameter's bytes: equal digests mean bitwise-equal models."""
    h = hashlib.sha256()
    for path, leaf in sorted(jax.tree_util.tree_leaves_with_path(params), key=lambda x: str(x[0])):
        h.update(jax.tree_util.keystr(path).encode())
        h.update(np.asarray(leaf).tobytes())
    return h.hexdigest()


def data_fingerprint(exp: Experiment) -> dict[str, Any]:
    """What a resumed run must train on again: the tokenised splits and the partition."""
    return {
        "train_examples": int(len(exp.train["label"])),
        "test_examples": int(len(exp.test["label"])),
        "num_classes": exp.num_classes,
        "train_sha256": params_digest(exp.train),
        "test_sha256": params_digest(exp.test),
        "partition_sha256": params_digest([exp.partition, exp.test_shards]),
        "source": exp.source,
    }


