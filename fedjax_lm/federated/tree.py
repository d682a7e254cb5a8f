"""Small pure pytree arithmetic shared by the hooks, the aggregators and the executors."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any


def tree_select(pred: jax.Array, on_true: PyTree, on_false: PyTree) -> PyTree:
    """Leaf-wise `where` with a scalar predicate (vmap-friendly, unlike `lax.cond`)."""
    return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


def tree_sub(a: PyTree, b: PyTree) -> PyTree:
    return jax.tree.map(lambda x, y: x - y, a, b)


def tree_zeros_like(tree: PyTree) -> PyTree:
    return jax.tree.map(jnp.zeros_like, tree)


def _sum_leaves(tree: PyTree) -> jax.Array:
    return sum(jax.tree.leaves(tree), jnp.zeros((), jnp.float32))


def squared_distance(a: PyTree, b: PyTree) -> jax.Array:
    """Σ‖a − b‖² over every leaf (FedProx's proximal term)."""
    return _sum_leaves(jax.tree.map(lambda x, y: jnp.sum(jnp.square(x - y)), a, b))


def tree_distance(a: PyTree, b: PyTree) -> jax.Array:
    """‖a − b‖₂ over the whole tree (a client's or the server's update norm)."""
    return jnp.sqrt(squared_distance(a, b))


def tree_all_finite(tree: PyTree) -> jax.Array:
    """True iff no leaf holds a NaN or Inf (a scalar bool); an empty tree is finite (plain
    FedAvg's server optimizer state)."""
    return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)], bool))


def tree_stack(trees: list[PyTree]) -> PyTree:
    """Stack same-structured trees on a new leading axis."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)
