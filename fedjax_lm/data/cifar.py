"""CIFAR-10 from the JPEG tarball in the data dir, decoded once and cached as .npz.

The tarball (train/<class>/NNNN.jpg, test/<class>/NNNN.jpg) is read in place with `tarfile` and
PIL; the decoded uint8 arrays go to the cache dir (keyed by the tarball's size/mtime and the
per-class limit), so only the first run pays for decoding 60k JPEGs. `per_class` reads only the
first n images per class and split, for tests.
"""

from __future__ import annotations

import io
import logging
import os
import tarfile
from pathlib import Path

import numpy as np

from fedjax_lm.data.cache import load_arrays, save_arrays
from fedjax_lm.data.errors import DataError
from fedjax_lm.data.registry import LoadContext, hub_dataset, register_task
from fedjax_lm.data.sources import require_file, resolve_cache_dir
from fedjax_lm.data.task_data import Split, TaskData

log = logging.getLogger(__name__)

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
CIFAR10_TARBALL = "cifar10/cifar10_jpeg.tar.gz"
_SPLITS = ("train", "test")


def _decode(data: bytes, name: str) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    except Exception as e:
        raise DataError(f"cannot decode image {name}: {e}") from e
    if arr.shape != (32, 32, 3):
        raise DataError(f"image {name} has shape {arr.shape}, expected (32, 32, 3)")
    return arr


def read_cifar10_tarball(
    tarball: Path, per_class: int | None = None
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Decode {split: (images uint8 [N,32,32,3], labels int32 [N])} from the tarball.

    Images are ordered by (class, file name), so `per_class` takes the first n files per class.
    Streams the gzip once and stops as soon as every (split, class) has its n images.
    """
    wanted = {(s, c) for s in _SPLITS for c in CIFAR10_CLASSES}
    found: dict[tuple[str, str], list[tuple[str, np.ndarray]]] = {k: [] for k in wanted}
    full = set()
    with tarfile.open(tarball, mode="r:gz") as tar:
        for member in tar:
            parts = member.name.strip("./").split("/")
            if not member.isfile() or len(parts) != 3 or not parts[2].lower().endswith(".jpg"):
                continue
            key = (parts[0], parts[1])
            if key not in wanted or key in full:
                continue
            f = tar.extractfile(member)
            assert f is not None
            found[key].append((parts[2], _decode(f.read(), member.name)))
            if per_class is not None and len(found[key]) >= per_class:
                full.add(key)
                if len(full) == len(wanted):
                    break
    out = {}
    for split in _SPLITS:
        images, labels = [], []
        for label, cls in enumerate(CIFAR10_CLASSES):
            items = sorted(found[(split, cls)], key=lambda x: x[0])
            if not items:
                raise DataError(f"{tarball}: no images under {split}/{cls}/")
            images.extend(img for _, img in items)
            labels.extend([label] * len(items))
        out[split] = (np.stack(images), np.asarray(labels, dtype=np.int32))
    return out


def load_cifar10_arrays(
    tarball: Path, per_class: int | None = None, cache_dir: str | os.PathLike[str] | None = None
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], bool]:
    """Decoded arrays (from the .npy cache when present) and whether the cache was hit."""
    stat = require_file(tarball).stat()
    key = f"{stat.st_size}-{int(stat.st_mtime)}-{'all' if per_class is None else per_class}"
    path = resolve_cache_dir(cache_dir, "cifar10") / f"{key}.npz"
    cached = load_arrays(path, _entry_check)
    if cached is not None:
        return {s: (cached[f"{s}_images"], cached[f"{s}_labels"]) for s in _SPLITS}, True
    log.info("decoding %s (per_class=%s); cached in %s", tarball, per_class, path)
    arrays = read_cifar10_tarball(tarball, per_class)
    save_arrays(path, {f"{s}_{k}": a for s in _SPLITS for k, a in zip(("images", "labels"),
                                                                      arrays[s], strict=True)})
    return arrays, False


def _entry_check(arrays: dict[str, np.ndarray]) -> str | None:
    """A cache entry holds images [N, 32, 32, 3] and labels [N] for both splits."""
    for s in _SPLITS:
        images, labels = arrays.get(f"{s}_images"), arrays.get(f"{s}_labels")
        if images is None or labels is None:
            return f"split {s}: no images or no labels"
        if images.shape[1:] != (32, 32, 3) or labels.shape != images.shape[:1]:
            return f"split {s}: images {images.shape}, labels {labels.shape}"
    return None


@register_task("cifar10", files=(CIFAR10_TARBALL,), hub_id="cifar10")
def _load_cifar10(ctx: LoadContext, per_class: int | None = None) -> TaskData:
    """CIFAR-10, 50k train / 10k test uint8 images; `per_class` limits images per class/split."""
    if per_class is not None and per_class <= 0:
        raise DataError(f"per_class must be positive, got {per_class}")
    if ctx.root is None and ctx.path is None:
        ds = hub_dataset(ctx)
        splits = {}
        for split in _SPLITS:
            part = ds[split]
            labels = np.asarray(part["label"], dtype=np.int32)
            idx = np.arange(len(labels))
            if per_class is not None:
                idx = np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(10)])
            images = np.stack([np.asarray(part[int(i)]["img"].convert("RGB")) for i in idx])
            splits[split] = Split(labels=labels[idx], images=images.astype(np.uint8))
        return TaskData(
            "cifar10", splits["train"], splits["test"], 10, CIFAR10_CLASSES, "image", "hub:cifar10"
        )
    tarball = ctx.path or ctx.root / CIFAR10_TARBALL  # type: ignore[operator]
    arrays, hit = load_cifar10_arrays(tarball, per_class, ctx.cache_dir)
    train = Split(labels=arrays["train"][1], images=arrays["train"][0])
    test = Split(labels=arrays["test"][1], images=arrays["test"][0])
    return TaskData(
        "cifar10",
        train,
        test,
        10,
        CIFAR10_CLASSES,
        "image",
        str(tarball),
        info={"cache_hit": hit, "per_class": per_class},
    )
