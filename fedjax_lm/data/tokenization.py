"""Tokenise a task's texts once and keep the arrays on disk: the population store.

A sweep runs the same (task, tokenizer, max length) many times; tokenising 50k reviews costs
more than a short federated run, so the arrays are stored as flat .npy files, memory-mapped by
every later run (a population of 10^6 clients is never loaded whole: a round reads its cohort's
rows). A store's fingerprint is the task, split, tokenizer identity (name + vocab size + hash of
its serialised pipeline), max length and a hash of the texts themselves (so a subset or a
changed data file never hits a stale store); one found with another fingerprint (e.g. an explicit
`store_dir` built for another task or tokenizer) is rebuilt, and a warning line says so. Stores
are built in a temp folder and renamed into place (parallel sweeps share one cache dir) and
their shapes are verified when opened (`data.cache`).

(Named `tokenization` rather than `tokenize` so it never shadows the standard-library module.)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedjax_lm.data.cache import open_store, save_store
from fedjax_lm.data.errors import DataError
from fedjax_lm.data.sources import resolve_cache_dir
from fedjax_lm.data.task_data import Split, TaskData

log = logging.getLogger(__name__)

TEXT_KEYS = ("input_ids", "attention_mask", "token_type_ids")
_CHUNK = 4096  # texts per tokenizer call: bounds peak memory of the Python-side encodings


@dataclass(frozen=True)
class TokenizedSplit:
    """Per-example arrays: `features` has input_ids / attention_mask / token_type_ids int32 [N, L]
    and label int32 [N]. `cache_hit` says whether they were read from `cache_path`."""

    features: dict[str, np.ndarray]
    cache_hit: bool
    cache_path: Path | None

    def __len__(self) -> int:
        return len(self.features["label"])


def load_tokenizer(name_or_path: str | os.PathLike[str]) -> Any:
    """`transformers.AutoTokenizer.from_pretrained` (a local folder works offline); never runs
    code shipped with the tokenizer."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(name_or_path), trust_remote_code=False)
    except Exception as e:
        raise DataError(f"cannot load tokenizer {name_or_path!r}: {type(e).__name__}: {e}") from e


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A stable id for what the tokenizer does: name, class, vocab size, padding/truncation side,
    and a hash of the fast tokenizer's serialised pipeline (vocab, normaliser, post-processor)."""
    parts: dict[str, Any] = {
        "name": str(getattr(tokenizer, "name_or_path", "")),
        "class": type(tokenizer).__name__,
        "vocab_size": len(tokenizer),
        "padding_side": getattr(tokenizer, "padding_side", None),
        "truncation_side": getattr(tokenizer, "truncation_side", None),
    }
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # the serialised pipeline also records the last call's truncation / padding settings;
        # those are per-call arguments (fixed by max_length here), not the tokenizer's identity
        pipeline = json.loads(backend.to_str())
        pipeline.pop("truncation", None)
        pipeline.pop("padding", None)
        blob = json.dumps(pipeline, sort_keys=True).encode()
        parts["pipeline"] = hashlib.sha256(blob).hexdigest()
    else:  # slow tokenizer: the vocabulary is what we can hash
        vocab = sorted(tokenizer.get_vocab().items())
        parts["vocab"] = hashlib.sha256(json.dumps(vocab).encode()).hexdigest()
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def texts_fingerprint(texts: list[str]) -> str:
    """Hash of the texts in order (length-prefixed, so boundaries cannot collide)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(str(len(texts)).encode())
    for text in texts:
        data = text.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def encode_texts(
    texts: list[str], tokenizer: Any, max_length: int, out: dict[str, np.ndarray] | None = None
) -> dict[str, np.ndarray]:
    """Truncate and pad every text to `max_length`; int32 input_ids / attention_mask /
    token_type_ids [N, L] (zeros for token_type_ids when the tokenizer has none), written into
    `out` (e.g. memory-mapped files) when given, chunk by chunk."""
    if max_length < 2:
        raise DataError(f"max_length must be >= 2, got {max_length}")
    n = len(texts)
    if out is None:
        out = {k: np.zeros((n, max_length), dtype=np.int32) for k in TEXT_KEYS}
    for start in range(0, n, _CHUNK):
        enc = tokenizer(
            texts[start : start + _CHUNK],
            truncation=True,
            padding="max_length",
            max_length=max_length,
            return_attention_mask=True,
            return_token_type_ids=True,
        )
        for key in TEXT_KEYS:
            if key in enc:
                out[key][start : start + _CHUNK] = np.asarray(enc[key], dtype=np.int32)
    return out


def tokenize_split(
    split: Split,
    tokenizer: Any,
    max_length: int,
    *,
    task: str,
    split_name: str,
    cache_dir: str | os.PathLike[str] | None = None,
    use_cache: bool = True,
    store_dir: str | os.PathLike[str] | None = None,
) -> TokenizedSplit:
    """Tokenised features of one split, read from / written to its store when `use_cache`
    (`store_dir`, else a folder of the cache dir named by the fingerprint). The arrays of a
    store are read-only memory maps; `label` is always the split's own (in memory)."""
    if split.texts is None:
        raise DataError(f"task {task!r} split {split_name!r} has no texts to tokenise")
    key = {
        "task": task,
        "split": split_name,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "max_length": max_length,
        "texts": texts_fingerprint(split.texts),
    }
    labels = split.labels.astype(np.int32)
    if not use_cache:
        return TokenizedSplit({**encode_texts(split.texts, tokenizer, max_length),
                               "label": labels}, False, None)
    if store_dir is not None:
        path = Path(store_dir).expanduser()
    else:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
        path = resolve_cache_dir(cache_dir, "tokenized") / (
            f"{task}-{split_name}-L{max_length}-{digest}")
    arrays, why = open_store(path, key)
    if arrays is not None and all(arrays[k].shape == (len(split), max_length) for k in TEXT_KEYS):
        log.info("tokenised %s/%s from store %s", task, split_name, path)
        return TokenizedSplit({**{k: arrays[k] for k in TEXT_KEYS}, "label": labels}, True, path)
    if why is not None:  # one line, then rebuilt: a stale store is never an error
        log.warning("population store %s: %s; rebuilding it", path, why)
    texts = split.texts

    def write(folder: Path) -> None:
        out = {k: np.lib.format.open_memmap(folder / f"{k}.npy", mode="w+", dtype=np.int32,
                                            shape=(len(texts), max_length)) for k in TEXT_KEYS}
        encode_texts(texts, tokenizer, max_length, out)
        for a in out.values():
            a.flush()

    arrays = save_store(path, key, write)
    log.info("tokenised %s/%s (%d texts) -> %s", task, split_name, len(split), path)
    return TokenizedSplit({**{k: arrays[k] for k in TEXT_KEYS}, "label": labels}, False, path)


def tokenize_task(
    task: TaskData,
    tokenizer: Any,
    max_length: int,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    use_cache: bool = True,
    store_dir: str | os.PathLike[str] | None = None,
) -> dict[str, TokenizedSplit]:
    """{"train": ..., "test": ...} for a text task (stores `store_dir`/train, /test if given)."""
    if task.modality != "text":
        raise DataError(f"task {task.name!r} is {task.modality}, not text: nothing to tokenise")
    return {
        name: tokenize_split(
            getattr(task, name),
            tokenizer,
            max_length,
            task=task.name,
            split_name=name,
            cache_dir=cache_dir,
            use_cache=use_cache,
            store_dir=None if store_dir is None else Path(store_dir) / name,
        )
        for name in ("train", "test")
    }


def image_features(split: Split) -> dict[str, np.ndarray]:
    """Per-example features of an image split: image uint8 [N,H,W,3] (packing makes it float32)
    and label int32 [N]."""
    if split.images is None:
        raise DataError("split has no images")
    return {"image": split.images, "label": split.labels.astype(np.int32)}
