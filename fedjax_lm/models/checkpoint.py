"""Reading Hugging Face safetensors checkpoints into our params, with errors that say what broke.

Only safetensors are read: a `pytorch_model.bin` is a pickle (arbitrary code on load), so it is
refused with instructions to convert. Tensors are fetched lazily by name, so unused checkpoint
weights (MLM / NSP heads, buffers) cost nothing and are ignored.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open

from fedjax_lm.models.api import Model, Params
from fedjax_lm.models.errors import ModelLoadError
from fedjax_lm.models.hf_weights import ARCH_PREFIX, hf_sources

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"


class SafetensorsCheckpoint:
    """Lazy name → array access over one or several (sharded) safetensors files."""

    def __init__(self, folder: Path):
        self.folder = folder
        single, index = folder / SAFETENSORS, folder / SAFETENSORS_INDEX
        if single.is_file():
            self.files = {name: single for name in _keys(single)}
        elif index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: folder / shard for name, shard in weight_map.items()}
        else:
            bins = sorted(p.name for p in folder.glob("*.bin"))
            if bins:
                raise ModelLoadError(
                    f"{folder} has only {', '.join(bins)} and no {SAFETENSORS}: PyTorch pickles "
                    "are never loaded (unpickling runs arbitrary code). Convert it to safetensors "
                    "(e.g. load it in PyTorch and call save_pretrained(..., "
                    "safe_serialization=True)) and point to the converted folder."
                )
            raise ModelLoadError(f"no {SAFETENSORS} in {folder}")

    def keys(self) -> set[str]:
        return set(self.files)

    def get(self, name: str) -> jax.Array:
        with safe_open(str(self.files[name]), framework="flax") as f:
            return f.get_tensor(name)


def _keys(path: Path) -> list[str]:
    try:
        with safe_open(str(path), framework="flax") as f:
            return list(f.keys())
    except Exception as e:  # corrupt / truncated file
        raise ModelLoadError(f"cannot read {path}: {e}") from e


def load_params(
    model: Model,
    names: set[str],
    get: Callable[[str], jax.Array],
    *,
    head_seed: int = 0,
    source: str = "checkpoint",
) -> Params:
    """Our params for `model` from HF tensors (`names` present, `get(name)` reads one).

    Body weights are required; the classification head is taken from the checkpoint only when
    all of it is there, otherwise initialised from `head_seed`. Parameters a checkpoint cannot
    hold (trainable activations) keep their initial values.
    """
    cfg = model.config
    table = hf_sources(cfg)
    prefix = ARCH_PREFIX[cfg.model_type]
    if not any(n.startswith(prefix) for n in names):
        prefix = ""  # bare checkpoint (e.g. a base model saved without its task wrapper)
    head_in_ckpt = all(
        any(n in names for n in src.names) for src in table.values() if src.in_head
    )
    key = jax.random.key(head_seed)
    params = jax.eval_shape(model.init, key)  # structure + shapes, nothing computed
    covered = {path for path, src in table.items() if not src.in_head}
    leaves = {_path(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
    if any(p[0] != "head" for p in leaves - covered):
        params = jax.jit(model.init)(key)  # e.g. trainable activations: need their init values
    if not head_in_ckpt:
        params = model.init_head(params, key)
    dtype = jnp.dtype(cfg.param_dtype)
    for path, src in table.items():
        if src.in_head and not head_in_ckpt:
            continue
        candidates = src.names if src.in_head else tuple(prefix + n for n in src.names)
        name = next((n for n in candidates if n in names), None)
        if name is None:
            raise ModelLoadError(
                f"{source}: missing weight {candidates[0]!r} (needed for {_fmt(path)})"
            )
        value = get(name)
        if src.transpose:
            value = value.T
        expected = _leaf(params, path).shape
        if tuple(value.shape) != tuple(expected):
            raise ModelLoadError(
                f"{source}: shape mismatch for {name!r}: checkpoint has {tuple(value.shape)}, "
                f"model expects {tuple(expected)} (param {_fmt(path)})"
            )
        _set_leaf(params, path, jnp.asarray(value, dtype=dtype))
    unset = [_fmt(_path(kp)) for kp, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
             if isinstance(leaf, jax.ShapeDtypeStruct)]
    assert not unset, f"parameters left without a value: {unset}"
    return params


def _path(keypath: tuple) -> tuple:
    return tuple(k.key for k in keypath)


def _fmt(path: tuple) -> str:
    return "/".join(str(p) for p in path)


def _leaf(tree: dict, path: tuple) -> np.ndarray:
    for p in path:
        tree = tree[p]
    return tree


def _set_leaf(tree: dict, path: tuple, value: jax.Array) -> None:
    for p in path[:-1]:
        tree = tree[p]
    tree[path[-1]] = value
