"""Where data comes from: the local data directory, tabular files read through `datasets`, and
the Hugging Face hub as a fallback.

Every machine of this project has the offline datasets at `../shared/data`, and only some have
a network, so local files come first (argument `data_dir`, else env `FEDJAX_LM_DATA_DIR`) and the
hub is tried only when neither is given. Offline, the hub is never contacted: the caller gets one
`DataError` saying how to provide the data.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from fedjax_lm.data.errors import DataError

log = logging.getLogger(__name__)


@contextlib.contextmanager
def quiet(logger: str) -> Iterator[None]:
    """`logger` (and its children) silent but for critical errors while the block runs: lines
    that the one DataError raised after them says better."""
    target = logging.getLogger(logger)
    level = target.level
    target.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        target.setLevel(level)

DATA_DIR_ENV = "FEDJAX_LM_DATA_DIR"
CACHE_DIR_ENV = "FEDJAX_LM_CACHE_DIR"
DEFAULT_CACHE_DIR = "~/.cache/fedjax_lm"

# Extension -> (datasets builder, extra builder kwargs).
_FORMATS: dict[str, tuple[str, dict[str, Any]]] = {
    ".csv": ("csv", {}),
    ".tsv": ("csv", {"delimiter": "\t"}),
    ".json": ("json", {}),
    ".jsonl": ("json", {}),
    ".parquet": ("parquet", {}),
}
_TEXT_FORMATS = {".csv", ".tsv", ".json", ".jsonl"}


def resolve_data_dir(data_dir: str | os.PathLike[str] | None) -> Path | None:
    """The data directory from the argument, else `$FEDJAX_LM_DATA_DIR`, else None (use the hub)."""
    value = data_dir if data_dir is not None else os.environ.get(DATA_DIR_ENV) or None
    if value is None:
        return None
    path = Path(value).expanduser()
    if not path.is_dir():
        what = "is a file, not a folder" if path.exists() else "does not exist"
        raise DataError(f"data directory {path} {what} (from data_dir / ${DATA_DIR_ENV})")
    return path


def resolve_cache_dir(
    cache_dir: str | os.PathLike[str] | None = None, subdir: str | None = None
) -> Path:
    """The cache directory (argument, else `$FEDJAX_LM_CACHE_DIR`, else ~/.cache/fedjax_lm), or
    its `subdir`, created if needed; one that cannot be a writable folder is a DataError.

    Decoded images, tokenised arrays and `datasets`' Arrow files go here, never into the repo.
    """
    value = cache_dir if cache_dir is not None else os.environ.get(CACHE_DIR_ENV) or None
    root = Path(value if value is not None else DEFAULT_CACHE_DIR).expanduser()
    path = root / subdir if subdir else root
    try:
        path.mkdir(parents=True, exist_ok=True)
        usable = os.access(path, os.W_OK | os.X_OK)
    except OSError as e:  # a file in the way (FileExistsError, NotADirectoryError), permissions
        usable, why = False, e.strerror or type(e).__name__
    else:
        why = "not writable"
    if not usable:
        raise DataError(
            f"cache directory {path} is unusable ({why}); point ${CACHE_DIR_ENV} at a writable "
            "folder or remove what is in the way"
        )
    return path


def require_file(path: Path) -> Path:
    """`path` if it is a file, else a DataError naming it."""
    if not path.is_file():
        raise DataError(f"missing file: {path}")
    return path


def check_utf8(path: Path) -> None:
    """Fail with the file name and line if a text file is not valid UTF-8.

    pandas/pyarrow would otherwise fail deep inside `datasets` with a message that names neither.
    """
    decoder = codecs.getincrementaldecoder("utf-8")()
    line, offset = 1, 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as e:
                bad = offset + e.start
                line += chunk[: e.start].count(b"\n")
                raise DataError(
                    f"{path} is not valid UTF-8 (byte {bad}, line {line}); re-save it as UTF-8"
                ) from None
            line += chunk.count(b"\n")
            offset += len(chunk)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise DataError(f"{path} is not valid UTF-8 (truncated character at the end)") from None


def read_table(
    path: str | os.PathLike[str],
    *,
    column_names: Sequence[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Mapping[str, list[Any]]:
    """Read a csv / tsv / json(l) / parquet file through `datasets` into {column: values}.

    `column_names` is for header-less csv/tsv files (AG News' alps_*.tsv). The Arrow files that
    `datasets` writes go under the cache dir so that a second read is a memory map.
    """
    path = require_file(Path(path).expanduser())
    suffix = path.suffix.lower()
    if suffix not in _FORMATS:
        raise DataError(
            f"unsupported file type {path.name!r}; use one of {', '.join(sorted(_FORMATS))}"
        )
    if suffix in _TEXT_FORMATS:
        check_utf8(path)
    builder, kwargs = _FORMATS[suffix]
    kwargs = dict(kwargs)
    if column_names is not None:
        kwargs["column_names"] = list(column_names)
    import datasets

    hf_cache = resolve_cache_dir(cache_dir, "hf_datasets")
    bars_were_on = not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        with quiet("datasets"):  # its "Failed to read file" lines: the DataError says it
            ds = datasets.load_dataset(
                builder, data_files={"train": str(path)}, cache_dir=str(hf_cache), **kwargs
            )["train"]
    except Exception as e:  # pandas/pyarrow errors name neither the file nor the line; find them
        problem = diagnose_table(path, column_names)
        if problem is None:
            problem = f"could not read {path}: {type(e).__name__}: {' '.join(str(e).split())}"
        raise DataError(problem) from e
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()
    table = ds.data.table
    # pandas reads rows with one field more than the header as an index column, shifting every
    # column by one without an error; and a file may hold no rows at all
    if "__index_level_0__" in table.column_names or table.num_rows == 0:
        raise DataError(diagnose_table(path, column_names) or f"{path}: no rows to read")
    return ColumnTable(table)


def diagnose_table(path: Path, column_names: Sequence[str] | None = None) -> str | None:
    """What is structurally wrong with a csv / tsv / json(l) file, naming the line: empty, a
    header and no rows, a row with more fields than the header, a line that is not JSON.
    None when none of those (or for parquet). Run only after a read failed: it rereads the file."""
    suffix = path.suffix.lower()
    if suffix not in _TEXT_FORMATS:
        return None
    with open(path, encoding="utf-8", newline="") as f:
        if not f.read(1 << 16).strip():
            return f"{path} is empty: it needs a header line and at least one row"
        f.seek(0)
        if suffix in (".csv", ".tsv"):
            return _diagnose_csv(path, f, "\t" if suffix == ".tsv" else ",", column_names)
        return _diagnose_json(path, f)


def _diagnose_csv(
    path: Path, f: Any, delimiter: str, column_names: Sequence[str] | None
) -> str | None:
    reader = csv.reader(f, delimiter=delimiter)
    header = list(column_names) if column_names is not None else next(reader, [])
    rows = 0
    for row in reader:
        if not any(field.strip() for field in row):
            continue
        rows += 1
        if len(row) > len(header):
            name = "tab" if delimiter == "\t" else "comma"
            return (
                f"{path} line {reader.line_num}: {len(row)} fields, but the header has "
                f"{len(header)} {header}; quote a text that contains a {name} "
                "or remove the extra field"
            )
    if rows == 0:
        return f"{path} has a header line {header} but no rows"
    return None


def _diagnose_json(path: Path, f: Any) -> str | None:
    text = f.read()
    if text.lstrip().startswith("["):  # one JSON array of records
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            return f"{path} line {e.lineno}: not valid JSON ({e.msg})"
        return None if records else f"{path} holds an empty JSON array: no rows"
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            return (f"{path} line {number}: not valid JSON ({e.msg}); JSON Lines needs one "
                    "object per line")
        if not isinstance(record, dict):
            return f"{path} line {number}: a JSON {type(record).__name__}, not an object"
    return None


class ColumnTable(Mapping[str, list[Any]]):
    """{column: values} over an Arrow table, converting a column to Python only when asked
    (IMDB's unused columns and 50k-row conversions are skipped)."""

    def __init__(self, table: Any) -> None:
        self._table = table
        self._cache: dict[str, list[Any]] = {}

    def __getitem__(self, column: str) -> list[Any]:
        if column not in self._table.column_names:
            raise KeyError(column)
        if column not in self._cache:
            self._cache[column] = self._table.column(column).to_pylist()
        return self._cache[column]

    def __iter__(self) -> Iterator[str]:
        return iter(self._table.column_names)

    def __len__(self) -> int:
        return len(self._table.column_names)


def require_column(
    table: Mapping[str, list[Any]], column: str, what: str, source: object
) -> list[Any]:
    """The column's values, or a DataError listing the columns that exist."""
    if column not in table:
        raise DataError(
            f"{source}: no {what} column {column!r}; available columns: {sorted(table)}"
        )
    return table[column]


def hub_offline() -> bool:
    """True when the environment says not to contact the Hugging Face hub."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in {"1", "true", "yes", "on"}:
            return True
    return False


def missing_data_message(task: str, expected: Sequence[str], hub_id: str | None) -> str:
    """How to provide the data for `task`: the flag / env var and the expected layout."""
    files = ", ".join(f"<data_dir>/{p}" for p in expected)
    hub = f"hub dataset {hub_id!r}" if hub_id else "no hub dataset"
    return (
        f"no data for task {task!r}: pass data_dir=... (CLI --data-dir) or set "
        f"${DATA_DIR_ENV} to a folder laid out like ../shared/data, with {files}; "
        f"the fallback ({hub}) needs a network and HF_HUB_OFFLINE unset"
    )


def load_hub(
    task: str,
    hub_id: str | None,
    expected: Sequence[str],
    *,
    config: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Any:
    """`datasets.load_dataset(hub_id)`, or the clear DataError when offline or it fails.

    The offline check happens before `datasets` is asked anything so that no network call is made.
    """
    message = missing_data_message(task, expected, hub_id)
    if hub_id is None or hub_offline():
        raise DataError(message)
    import datasets

    hf_cache = resolve_cache_dir(cache_dir, "hf_datasets")
    log.warning("task %s: no local files; loading %r from the Hugging Face hub (offline, this "
                "fails after the hub client's retries, ~30 s)", task, hub_id)
    try:
        with quiet("huggingface_hub"):  # a warning per retry: the DataError below says why
            return datasets.load_dataset(hub_id, config, cache_dir=str(hf_cache))
    except Exception as e:
        raise DataError(f"{message} (hub error: {type(e).__name__}: {e})") from e
