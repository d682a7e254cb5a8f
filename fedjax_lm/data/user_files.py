"""The `csv` task: the user's own train / test files (csv, tsv, json(l), parquet).

The classes come from the set of labels in the train file, never from max(label) + 1, and a label
column that looks wrong is refused with the offending values and rows (0-based, header not
counted) rather than trained on: one typo must not build a million-class head, nor a stray name
among numbers add a class. Integer labels must be 0..K-1 without gaps unless `num_classes` pins
K; names are numbered in sorted order unless `label_names` pins the order. The mapping goes into
`TaskData.info["label_summary"]`, which every run prints. Every problem with the files is a
`DataError` naming the file, column, row or value.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedjax_lm.data.errors import DataError
from fedjax_lm.data.registry import LoadContext, register_task
from fedjax_lm.data.sources import read_table, require_column
from fedjax_lm.data.task_data import Split, TaskData, clean_texts

log = logging.getLogger(__name__)

Key = int | str  # a label as read: an integer, or a name
# A label column with more distinct values than this share of its rows, and more than
# _UNIQUE_MIN of them, holds texts or ids (swapped columns), not classes.
_UNIQUE_SHARE = 0.5
_UNIQUE_MIN = 10
_SHOWN = 4  # offending values named in a message (each with its first rows)
_LISTED = 30  # classes listed in the label summary


def _read(
    file: Path, text_column: str, label_column: str, group_column: str | None, ctx: LoadContext
) -> tuple[list[str], list[Key], np.ndarray | None]:
    table = read_table(file, cache_dir=ctx.cache_dir)
    src = str(file)
    raw_texts = require_column(table, text_column, "text", src)
    labels = require_column(table, label_column, "label", src)
    texts, _ = clean_texts(raw_texts, f"{src} column {text_column!r}", drop_empty=False)
    keys = [_key(value, src, label_column, i) for i, value in enumerate(labels)]
    groups = None
    if group_column is not None:
        groups = np.asarray([str(g) for g in require_column(table, group_column, "group", src)])
    return texts, keys, groups


def _key(value: Any, src: str, column: str, row: int) -> Key:
    """An integer label as int (also "3" and 3.0: pandas makes int columns with gaps float),
    any other label as its stripped text."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        raise DataError(f"{src}: missing label in row {row} (column {column!r})")
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, (float, np.floating)):
        if not float(value).is_integer():
            raise DataError(f"{src}: label {value!r} in row {row} is not an integer (column "
                            f"{column!r}); labels are integers 0..K-1 or class names")
        return int(value)
    text = str(value).strip()
    return int(text) if re.fullmatch(r"[+-]?\d+", text) else text


def _offenders(keys: Sequence[Key], bad: Callable[[Key], bool]) -> str:
    """"'pos' (rows 3, 9), 7 (row 12)": the first offending values, each with its first rows."""
    rows: dict[Key, list[int]] = {}
    for i, key in enumerate(keys):
        if bad(key):
            rows.setdefault(key, []).append(i)
    parts = []
    for key, where in list(rows.items())[:_SHOWN]:
        shown = ", ".join(map(str, where[:3])) + (f" +{len(where) - 3} more" if len(where) > 3
                                                  else "")
        parts.append(f"{key!r} (row{'s' if len(where) > 1 else ''} {shown})")
    if len(rows) > _SHOWN:
        parts.append(f"and {len(rows) - _SHOWN} more values")
    return ", ".join(parts)


def resolve_labels(
    files: Sequence[tuple[str, Sequence[Key]]],
    column: str,
    num_classes: int | None = None,
    label_names: Sequence[str] | None = None,
) -> tuple[tuple[str, ...], list[np.ndarray]]:
    """(class names, int32 labels per file) for the label keys of the train file (first) and the
    test file, or a DataError naming the file, the offending values and their rows."""
    (train_src, train), *_ = files
    where = f"{train_src} column {column!r}"
    distinct = Counter(train)
    if len(distinct) < 2:
        value, count = next(iter(distinct.items()), (None, 0))
        raise DataError(f"{where} has a single class ({value!r} in all {count} rows); a "
                        "classifier needs at least 2: check --label-column and the file")
    pinned = num_classes is not None or label_names is not None
    if not pinned and len(distinct) > max(_UNIQUE_MIN, _UNIQUE_SHARE * len(train)):
        examples = ", ".join(repr(str(k)[:30]) for k in list(distinct)[:3])
        raise DataError(
            f"{where} looks like texts or ids, not labels: {len(distinct)} distinct values in "
            f"{len(train)} rows (e.g. {examples}); check --label-column / --text-column, or pin "
            "the classes with --num-labels / --label-names"
        )
    if label_names is not None:
        names = tuple(label_names)
        if num_classes is not None and num_classes != len(names):
            raise DataError(f"num_labels={num_classes} but label_names has {len(names)} names")
        # labels are the names, or (all integers, not all names) indices into them
        keys = [k for _, file_keys in files for k in file_keys]
        by_index = all(isinstance(k, int) for k in keys) and not all(str(k) in names
                                                                     for k in keys)
        index: dict[Key, int] = ({i: i for i in range(len(names))} if by_index else
                                 {k: names.index(str(k)) for k in keys if str(k) in names})
        _refuse(files, column, lambda k: k not in index,
                f"label(s) that are neither one of --label-names {list(names)} nor an index "
                f"0..{len(names) - 1}", "fix those rows or --label-names")
        return names, _encode(files, index)
    ints = sum(isinstance(k, int) for _, keys in files for k in keys)
    total = sum(len(keys) for _, keys in files)
    if 0 < ints < total:
        odd, usual = ((str, "numbers") if ints >= total - ints else (int, "names"))
        fix = "make every label a number or every label a name, or pin the classes with " \
              "--label-names"
        mixed = [(src, keys) for src, keys in files if len({isinstance(k, int) for k in keys}) > 1]
        _refuse(mixed, column, lambda k: isinstance(k, odd), f"a mix of numbers and names "
                f"(mostly {usual})", fix)
        # each file is all numbers or all names: the mix is between the files
        src, keys = next((s, k) for s, k in files if k and isinstance(k[0], odd))
        others = ", ".join(s for s, k in files if k and not isinstance(k[0], odd))
        raise DataError(f"{src} column {column!r} holds "
                        f"{'numbers' if odd is int else 'names'} "
                        f"({_offenders(keys, lambda k: True)}) where {others} holds {usual}; "
                        f"{fix}")
    if ints:
        _refuse(files, column, lambda k: k < 0, "negative label(s)", "labels are 0..K-1")
        if num_classes is not None:
            _refuse(files, column, lambda k: k >= num_classes,
                    f"label(s) outside 0..{num_classes - 1} (--num-labels {num_classes})",
                    "fix those rows or raise --num-labels")
            return tuple(map(str, range(num_classes))), _encode(files, {})
        top = max(distinct)
        gap = next(i for i in range(top + 2) if i not in distinct)
        if gap <= top:
            missing = [i for i in range(top + 1) if i not in distinct]
            what = (f"{missing[0]} never occurs" if len(missing) == 1 else
                    f"{len(missing)} values from {missing[0]} to {missing[-1]} never occur")
            fix = ("integer labels are the classes 0..K-1: fix those rows, or pin the classes "
                   "with --num-labels K (or name them with --label-names)")
            if missing == [0]:
                fix = (f"labels 1..{top} look 1-based: renumber them 0..{top - 1}, or use them "
                       f"as names with --label-names {','.join(map(str, range(1, top + 1)))}")
            _refuse(files[:1], column, lambda k: k > gap,
                    f"integer labels with a gap ({what})", fix)
        names = tuple(map(str, range(top + 1)))
    else:
        if num_classes is not None and num_classes != len(distinct):
            raise DataError(f"{where}: num_labels={num_classes} but the column has "
                            f"{len(distinct)} names: {sorted(distinct)}; pin them with "
                            "--label-names instead")
        names = tuple(sorted(map(str, distinct)))
    _refuse(files[1:], column, lambda k: k not in distinct,
            f"label(s) that never occur in {train_src}", "the model would never train on "
            f"them: fix those rows, or pin the classes with "
            f"{'--num-labels' if ints else '--label-names'}")
    return names, _encode(files, {} if ints else {n: i for i, n in enumerate(names)})


def _refuse(files: Sequence[tuple[str, Sequence[Key]]], column: str,
            bad: Callable[[Key], bool], what: str, fix: str) -> None:
    """A DataError for the first file with `bad` labels: `what`, the offenders, then `fix`."""
    for src, keys in files:
        offenders = _offenders(keys, bad)
        if offenders:
            raise DataError(f"{src} column {column!r} has {what}: {offenders}; {fix}")


def _encode(files: Sequence[tuple[str, Sequence[Key]]], index: dict[Key, int]) -> list[np.ndarray]:
    """Class indices per file; an empty `index` means the integer labels are the indices."""
    return [np.asarray([index[k] if index else k for k in keys], dtype=np.int32)
            for _, keys in files]


def label_summary(names: Sequence[str], labels: np.ndarray, where: str) -> str:
    """One line for the start of a run: every class index, its name and its row count."""
    counts = np.bincount(labels, minlength=len(names))
    parts = [f"{i}{'' if name == str(i) else f'={name!r}'} ({n} row{'' if n == 1 else 's'})"
             for i, (name, n) in enumerate(zip(names[:_LISTED], counts, strict=False))]
    if len(names) > _LISTED:
        parts.append(f"... {len(names) - _LISTED} more")
    return f"labels of {where}: {len(names)} classes: {', '.join(parts)}"


@register_task("csv", needs_data=False, seeded=True)
def _load_csv(
    ctx: LoadContext,
    train_file: str | None = None,
    test_file: str | None = None,
    text_column: str = "text",
    label_column: str = "label",
    group_column: str | None = None,
    num_classes: int | None = None,
    label_names: Sequence[str] | None = None,
    test_fraction: float = 0.2,
) -> TaskData:
    """Load the user's files; without `test_file`, a seeded `test_fraction` of train is held out.

    `num_classes` pins K for integer labels (classes that never occur are allowed);
    `label_names` pins the classes' names and order (labels are those names, or indices).
    """
    if train_file is None:
        raise DataError("task 'csv' needs train_file=... (and optionally test_file=...)")
    if num_classes is not None and num_classes < 2:
        raise DataError(f"num_classes must be >= 2, got {num_classes}")
    if label_names is not None and (len(set(label_names)) != len(label_names) or
                                    len(label_names) < 2 or not all(label_names)):
        raise DataError(f"label_names must be 2 or more distinct names, got {list(label_names)}")
    files = [Path(train_file).expanduser()]
    if test_file is not None:
        files.append(Path(test_file).expanduser())
    elif not 0.0 < test_fraction < 1.0:
        raise DataError(f"test_fraction must be in (0, 1), got {test_fraction}")
    parts = [_read(f, text_column, label_column, group_column, ctx) for f in files]
    names, int_parts = resolve_labels(
        [(str(f), keys) for f, (_, keys, _) in zip(files, parts, strict=True)],
        label_column, num_classes, label_names,
    )
    by_name = any(isinstance(k, str) for k in parts[0][1])
    mapping = {name: i for i, name in enumerate(names)} if by_name else None
    summary = label_summary(names, int_parts[0], f"{files[0]} column {label_column!r}")
    log.info("task csv: %s", summary)

    splits = [
        Split(labels=lab, texts=texts, groups=groups)
        for (texts, _, groups), lab in zip(parts, int_parts, strict=True)
    ]
    if test_file is None:
        n = len(splits[0])
        perm = np.random.default_rng(ctx.seed).permutation(n)
        n_test = max(1, int(round(test_fraction * n)))
        splits = [
            splits[0].select(np.sort(perm[n_test:])),
            splits[0].select(np.sort(perm[:n_test])),
        ]
    info = {"label_mapping": mapping, "label_summary": summary,
            "files": [str(f) for f in files]}
    return TaskData("csv", splits[0], splits[1], len(names), names, source=str(files[0]),
                    info=info)
