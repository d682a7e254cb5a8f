"""The in-memory form of a task: train / test splits with integer labels.

Every loader (local files, hub, generated, images) ends in the same `TaskData`, so partitioning,
tokenisation and packing never care where the data came from. The label / text checks live here
because every loader needs them and they produce the user-facing error messages.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from fedjax_lm.data.errors import DataError


@dataclass(frozen=True)
class Split:
    """One split: `labels` int32 [N] and either `texts` (N strings) or `images` uint8 [N,H,W,3].

    `groups` (optional, [N]) is a natural client key such as the blog author.
    """

    labels: np.ndarray
    texts: list[str] | None = None
    images: np.ndarray | None = None
    groups: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.labels)
        if (self.texts is None) == (self.images is None):
            raise ValueError("a Split holds exactly one of texts / images")
        for name in ("texts", "images", "groups"):
            value = getattr(self, name)
            if value is not None and len(value) != n:
                raise ValueError(f"Split.{name} has {len(value)} rows, labels has {n}")

    def __len__(self) -> int:
        return len(self.labels)

    def select(self, indices: Sequence[int] | np.ndarray) -> Split:
        """The rows `indices`, in that order."""
        idx = np.asarray(indices, dtype=np.int64)
        return Split(
            labels=self.labels[idx],
            texts=None if self.texts is None else [self.texts[i] for i in idx],
            images=None if self.images is None else self.images[idx],
            groups=None if self.groups is None else self.groups[idx],
        )


@dataclass(frozen=True)
class TaskData:
    """A loaded task. `label_names[i]` names class i; `source` says which files / hub id."""

    name: str
    train: Split
    test: Split
    num_classes: int
    label_names: tuple[str, ...]
    modality: Literal["text", "image"] = "text"
    source: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    def label_histogram(self, split: Literal["train", "test"] = "train") -> np.ndarray:
        """Counts per class, [num_classes]."""
        labels = getattr(self, split).labels
        return np.bincount(labels, minlength=self.num_classes)


def subsample(split: Split, n: int | None, seed: int) -> Split:
    """A seeded random subset of `n` rows kept in their original order (all rows if n is None).

    Random rather than the first n rows because several files are sorted by label.
    """
    if n is None or n >= len(split):
        return split
    if n <= 0:
        raise DataError(f"subset size must be positive, got {n}")
    idx = np.sort(np.random.default_rng(seed).choice(len(split), size=n, replace=False))
    return split.select(idx)


def clean_texts(
    values: Sequence[Any], source: str, *, drop_empty: bool
) -> tuple[list[str], np.ndarray]:
    """Texts as `str` plus the kept row indices; empty / missing texts are an error or dropped.

    User files get an error naming the row (an empty text is almost always a broken file);
    the public datasets get empty rows dropped, as their hub versions contain a few.
    """
    texts: list[str] = []
    keep: list[int] = []
    for i, value in enumerate(values):
        text = "" if value is None else str(value)
        if not text.strip():
            if drop_empty:
                continue
            raise DataError(f"{source}: empty text in row {i} (0-based, header not counted)")
        texts.append(text)
        keep.append(i)
    return texts, np.asarray(keep, dtype=np.int64)


def int_labels(values: Sequence[Any], source: str, num_classes: int | None = None) -> np.ndarray:
    """Validate integer labels (0-based) and return them as int32.

    Floats are accepted only when integral (pandas turns int columns with gaps into floats).
    """
    out = np.empty(len(values), dtype=np.int64)
    for i, value in enumerate(values):
        if isinstance(value, bool) or value is None:
            raise DataError(f"{source}: label {value!r} in row {i} is not an integer")
        integral = isinstance(value, (int, np.integer)) or (
            isinstance(value, (float, np.floating)) and float(value).is_integer()
        )
        if integral:
            out[i] = int(value)
        else:
            raise DataError(f"{source}: label {value!r} in row {i} is not an integer")
        if out[i] < 0 or (num_classes is not None and out[i] >= num_classes):
            limit = f"[0, {num_classes - 1}]" if num_classes is not None else ">= 0"
            raise DataError(f"{source}: label {out[i]} in row {i} is out of range {limit}")
    return out.astype(np.int32)


def named_labels(values: Sequence[Any], names: Sequence[str], source: str) -> np.ndarray:
    """Map label names to their index in `names`; an unknown name is an error naming it."""
    index = {name: i for i, name in enumerate(names)}
    out = np.empty(len(values), dtype=np.int32)
    for i, value in enumerate(values):
        key = None if value is None else str(value).strip()
        if key not in index:
            raise DataError(
                f"{source}: unknown label {value!r} in row {i}; expected one of {list(names)}"
            )
        out[i] = index[key]
    return out
