"""Data layer: tasks on disk (or the hub) -> tokenised features -> client partitions -> the
engine's stacked [C, S, B, ...] arrays. See the module docstrings for the why of each step."""

from fedjax_lm.data.errors import DataError
from fedjax_lm.data.pack import pack_clients, pack_clients_eval, pack_eval, steps_per_client
from fedjax_lm.data.partition import (
    PARTITIONERS,
    ClientIndex,
    ClientSplits,
    dirichlet,
    iid,
    label_sorted,
    list_partitioners,
    majority,
    make_partitioner,
    natural,
    ordered_pairs,
    quantity_skew,
    split_clients,
    validate_partition,
)
from fedjax_lm.data.registry import TASKS, list_tasks
from fedjax_lm.data.sources import CACHE_DIR_ENV, DATA_DIR_ENV, read_table
from fedjax_lm.data.task_data import Split, TaskData
from fedjax_lm.data.tasks import load_task
from fedjax_lm.data.tokenization import (
    TokenizedSplit,
    image_features,
    load_tokenizer,
    tokenize_split,
    tokenize_task,
    tokenizer_fingerprint,
)

__all__ = [
    "CACHE_DIR_ENV",
    "DATA_DIR_ENV",
    "PARTITIONERS",
    "TASKS",
    "ClientIndex",
    "ClientSplits",
    "DataError",
    "Split",
    "TaskData",
    "TokenizedSplit",
    "dirichlet",
    "iid",
    "image_features",
    "label_sorted",
    "list_partitioners",
    "list_tasks",
    "load_task",
    "load_tokenizer",
    "majority",
    "make_partitioner",
    "natural",
    "ordered_pairs",
    "pack_clients",
    "pack_clients_eval",
    "pack_eval",
    "quantity_skew",
    "read_table",
    "split_clients",
    "steps_per_client",
    "tokenize_split",
    "tokenize_task",
    "tokenizer_fingerprint",
    "validate_partition",
]
