"""Tokenise a task's texts once and cache the arrays on disk.

A sweep runs the same (task, tokenizer, max length) many times; tokenising 50k reviews costs
more than a short federated run, so the arrays are cached as .npz keyed by the task, split,
tokenizer identity (name + vocab size + hash of its serialised pipeline), max length and a hash
of the texts themselves (so a subset or a changed file never hits a stale entry). Entries are
written atomically (parallel sweeps share one cache dir) and verified when read (`data.cache`).

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

from fedjax_lm.data.cache import Check, load_arrays, save_arrays
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


def encode_texts(texts: list[str], tokenizer: Any, max_length: int) -> dict[str, np.ndarray]:
    """Truncate and pad every text to `max_length`; int32 input_ids / attention_mask /
    token_type_ids [N, L] (zeros for token_type_ids when the tokenizer has none)."""
    if max_length < 2:
        raise DataError(f"max_length must be >= 2, got {max_length}")
    n = len(texts)
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
) -> TokenizedSplit:
    """Tokenised features of one split, read from / written to the cache when `use_cache`."""
    if split.texts is None:
        raise DataError(f"task {task!r} split {split_name!r} has no texts to tokenise")
    key = {
        "task": task,
        "split": split_name,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "max_length": max_length,
        "texts": texts_fingerprint(split.texts),
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    path: Path | None = None
    if use_cache:
        path = resolve_cache_dir(cache_dir, "tokenized") / (
            f"{task}-{split_name}-L{max_length}-{digest}.npz")
        features = load_arrays(path, _entry_check(len(split), max_length))
        if features is not None:
            features["label"] = split.labels.astype(np.int32)
            log.info("tokenised %s/%s from cache %s", task, split_name, path)
            return TokenizedSplit(features, True, path)
    features = encode_texts(split.texts, tokenizer, max_length)
    features["label"] = split.labels.astype(np.int32)
    if path is not None:
        save_arrays(path, features)
        log.info("tokenised %s/%s (%d texts) -> %s", task, split_name, len(split), path)
    return TokenizedSplit(features, False, path)


def _entry_check(n: int, max_length: int) -> Check:
    """What a cache entry for `n` texts must hold: every text key as [n, max_length]."""

    def check(arrays: dict[str, np.ndarray]) -> str | None:
        shapes = {k: getattr(arrays.get(k), "shape", None) for k in TEXT_KEYS}
        if any(shape != (n, max_length) for shape in shapes.values()):
            return f"expected {list(TEXT_KEYS)} of shape {(n, max_length)}, found {shapes}"
        return None

    return check


def tokenize_task(
    task: TaskData,
    tokenizer: Any,
    max_length: int,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    use_cache: bool = True,
) -> dict[str, TokenizedSplit]:
    """{"train": ..., "test": ...} for a text task."""
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
        )
        for name in ("train", "test")
    }


def image_features(split: Split) -> dict[str, np.ndarray]:
    """Per-example features of an image split: image uint8 [N,H,W,3] (packing makes it float32)
    and label int32 [N]."""
    if split.images is None:
        raise DataError("split has no images")
    return {"image": split.images, "label": split.labels.astype(np.int32)}
