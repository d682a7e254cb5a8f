"""Which parameters train: a boolean mask over the params pytree, and the split / merge it
implies (parameter-efficient fine-tuning, model-agnostic).

A `Trainable` mask has the params' structure with a Python bool per leaf (static: it shapes the
program, it never enters it). `split` gives two pytrees of the same structure in which the other
side's leaves are `None` (an empty subtree to `jax.tree`), so optimizers, aggregators, `vmap`
and sums see only their side; `merge` puts them back together. The algorithm keeps only the
trainable side (and its optimizer state) per client and reads the frozen side from the broadcast
server state: one copy per round, never a gradient.

`client_mask` (optional) multiplies a client's trainable leaves and their gradients by a
per-client 0/1 pytree: a component it zeroes starts at zero, never moves and is sent as zero
(heterogeneous LoRA ranks as masks on padded tensors: one compiled program for every rank).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np

PyTree = Any
Trainable = PyTree  # the params' structure, a Python bool per leaf
# (trainable params of one client, its population id) -> 0/1 multipliers of the same structure
ClientMask = Callable[[PyTree, jax.Array], PyTree]


def mask_from_predicate(params: PyTree, predicate: Callable[[tuple[str, ...]], bool]) -> Trainable:
    """A mask marking the leaves whose path (a tuple of key names, e.g.
    `("layers", "0", "attention", "query", "kernel")`) satisfies `predicate`."""

    def leaf(path, _):
        return bool(predicate(tuple(_name(k) for k in path)))

    return jax.tree_util.tree_map_with_path(leaf, params)


def _name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def split(mask: Trainable, params: PyTree) -> tuple[PyTree, PyTree]:
    """(trainable, frozen): the params with the other side's leaves replaced by None."""
    trainable = jax.tree.map(lambda m, x: x if m else None, mask, params)
    frozen = jax.tree.map(lambda m, x: None if m else x, mask, params)
    return trainable, frozen


def trainable_part(mask: Trainable | None, params: PyTree) -> PyTree:
    """The trainable side only (all of `params` when there is no mask)."""
    return params if mask is None else split(mask, params)[0]


def merge(mask: Trainable, trainable: PyTree, frozen: PyTree) -> PyTree:
    """The inverse of `split`."""
    flags, treedef = jax.tree.flatten(mask)
    t, f = iter(jax.tree.leaves(trainable)), iter(jax.tree.leaves(frozen))
    return jax.tree.unflatten(treedef, [next(t) if m else next(f) for m in flags])


def with_trainable(mask: Trainable | None, params: PyTree, trainable: PyTree) -> PyTree:
    """`params` with its trainable leaves replaced by `trainable`."""
    return trainable if mask is None else merge(mask, trainable, split(mask, params)[1])


def count(mask: Trainable | None, params: PyTree) -> tuple[int, int]:
    """(trainable bytes, all bytes) of `params` (arrays or shape structs)."""
    def nbytes(tree):
        return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
                   for x in jax.tree.leaves(tree))

    return nbytes(trainable_part(mask, params)), nbytes(params)


def apply_client_mask(client_mask: ClientMask | None, tree: PyTree, template: PyTree,
                      client_id: jax.Array) -> PyTree:
    """`tree * client_mask(template, id)` leaf-wise; `tree` unchanged without a mask."""
    if client_mask is None:
        return tree
    factors = client_mask(template, client_id)
    return jax.tree.map(lambda x, m: x * m.astype(x.dtype), tree, factors)
