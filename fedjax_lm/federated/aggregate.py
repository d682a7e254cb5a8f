"""FedAvg aggregation as a weighted mean over the client axis (axis 0).

Weights are normalised *before* the clients run (p_i = w_i / Σw), and the engine
accumulates Σ p_i·x_i in chunks, so chunked, sharded and looped rounds compute the same
mean; with one client p = 1 and the mean is that client's model bit for bit. Clients
whose update is not finite are dropped from the sum (their p is removed from Σp).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from fedjax_lm.federated.state import ClientResult, Params


class Accumulator(NamedTuple):
    """Running sums over the clients processed so far (a pytree: can be psum'ed)."""

    weighted_params: Params  # Σ p_i x_i over finite clients
    weight: jax.Array  # Σ p_i over finite clients
    loss: jax.Array  # Σ n_i·loss_i over finite clients
    examples: jax.Array  # Σ n_i over finite clients


def normalize_weights(weights: jax.Array) -> jax.Array:
    """p = w / Σw; all-zero weights (no real data at all) stay zero."""
    total = jnp.sum(weights)
    return weights / jnp.where(total > 0, total, 1.0)


def zeros_accumulator(params: Params) -> Accumulator:
    zeros = [jnp.zeros((), jnp.float32) for _ in range(3)]  # distinct buffers: donated
    return Accumulator(jax.tree.map(jnp.zeros_like, params), *zeros)


def is_finite(tree: Params) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves))


def client_update_norm(client_params: Params, server_params: Params) -> jax.Array:
    sq = jax.tree.map(lambda c, s: jnp.sum(jnp.square(c - s)), client_params, server_params)
    return jnp.sqrt(sum(jax.tree.leaves(sq), jnp.zeros((), jnp.float32)))


def accumulate(
    acc: Accumulator, results: ClientResult, p: jax.Array, finite: jax.Array
) -> Accumulator:
    """Add a block of clients (leading axis K) to the running sums."""
    p = jnp.where(finite, p, 0.0)

    def weighted_sum(acc_leaf, x):
        x = jnp.where(finite.reshape((-1,) + (1,) * (x.ndim - 1)), x, 0)
        return acc_leaf + jnp.tensordot(p.astype(x.dtype), x, axes=1)

    n = jnp.where(finite, results.num_examples, 0.0)
    return Accumulator(
        weighted_params=jax.tree.map(weighted_sum, acc.weighted_params, results.params),
        weight=acc.weight + jnp.sum(p),
        loss=acc.loss + jnp.sum(n * jnp.where(finite, results.loss, 0.0)),
        examples=acc.examples + jnp.sum(n),
    )


def weighted_mean(acc: Accumulator, server_params: Params) -> Params:
    """Σ p_i x_i / Σ p_i; the server params when no client contributed."""
    has_any = acc.weight > 0
    denom = jnp.where(has_any, acc.weight, 1.0)
    return jax.tree.map(
        lambda s, x: jnp.where(has_any, x / denom.astype(x.dtype), s),
        server_params,
        acc.weighted_params,
    )
