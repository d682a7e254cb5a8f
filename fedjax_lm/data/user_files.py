"""The `csv` task: the user's own train / test files (csv, tsv, json(l), parquet).

Labels may be integers (0-based) or names; names are mapped to integers in sorted order and the
mapping is logged and kept in `TaskData.info["label_mapping"]`. Every problem with the files is a
`DataError` naming the file, column, row or value.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from fedjax_lm.data.errors import DataError
from fedjax_lm.data.registry import LoadContext, register_task
from fedjax_lm.data.sources import read_table, require_column
from fedjax_lm.data.task_data import Split, TaskData, clean_texts, int_labels, named_labels

log = logging.getLogger(__name__)


def _is_numeric(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float, np.integer, np.floating)):
        return True
    return isinstance(value, str) and value.strip().lstrip("-").isdigit()


def _as_number(value: Any) -> Any:
    return int(value.strip()) if isinstance(value, str) else value


def _read(
    file: Path, text_column: str, label_column: str, group_column: str | None, ctx: LoadContext
) -> tuple[list[str], list[Any], np.ndarray | None]:
    table = read_table(file, cache_dir=ctx.cache_dir)
    src = str(file)
    raw_texts = require_column(table, text_column, "text", src)
    labels = require_column(table, label_column, "label", src)
    texts, _ = clean_texts(raw_texts, f"{src} column {text_column!r}", drop_empty=False)
    for i, value in enumerate(labels):
        if value is None or (isinstance(value, float) and np.isnan(value)):
            raise DataError(f"{src}: missing label in row {i} (column {label_column!r})")
    groups = None
    if group_column is not None:
        groups = np.asarray([str(g) for g in require_column(table, group_column, "group", src)])
    return texts, labels, groups


@register_task("csv", needs_data=False)
def _load_csv(
    ctx: LoadContext,
    train_file: str | None = None,
    test_file: str | None = None,
    text_column: str = "text",
    label_column: str = "label",
    group_column: str | None = None,
    num_classes: int | None = None,
    test_fraction: float = 0.2,
) -> TaskData:
    """Load the user's files; without `test_file`, a seeded `test_fraction` of train is held out."""
    if train_file is None:
        raise DataError("task 'csv' needs train_file=... (and optionally test_file=...)")
    if num_classes is not None and num_classes < 2:
        raise DataError(f"num_classes must be >= 2, got {num_classes}")
    files = [Path(train_file).expanduser()]
    if test_file is not None:
        files.append(Path(test_file).expanduser())
    elif not 0.0 < test_fraction < 1.0:
        raise DataError(f"test_fraction must be in (0, 1), got {test_fraction}")
    parts = [_read(f, text_column, label_column, group_column, ctx) for f in files]

    all_labels = [v for _, labels, _ in parts for v in labels]
    mapping: dict[str, int] | None = None
    if all(_is_numeric(v) for v in all_labels):
        int_parts = [
            int_labels([_as_number(v) for v in labels], str(f), num_classes)
            for f, (_, labels, _) in zip(files, parts, strict=True)
        ]
        n_classes = num_classes or int(max(int(p.max()) for p in int_parts)) + 1
        names = tuple(str(i) for i in range(n_classes))
    else:
        names = tuple(sorted({str(v).strip() for v in all_labels}))
        if num_classes is not None and num_classes != len(names):
            raise DataError(
                f"num_classes={num_classes} but the label column has {len(names)} names: "
                f"{list(names)}"
            )
        n_classes = len(names)
        mapping = {name: i for i, name in enumerate(names)}
        log.info("task csv: label mapping %s", mapping)
        int_parts = [
            named_labels(labels, names, str(f))
            for f, (_, labels, _) in zip(files, parts, strict=True)
        ]
    if n_classes < 2:
        raise DataError(f"{files[0]}: need at least 2 classes, found labels {list(names)}")

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
    info = {"label_mapping": mapping, "files": [str(f) for f in files]}
    return TaskData("csv", splits[0], splits[1], n_classes, names, source=str(files[0]), info=info)
