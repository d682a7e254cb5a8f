"""Aggregators: how the server reduces the clients' messages over the client axis.

An aggregator either **decomposes into chunk sums** (`init` / `add` / `finalize`: the weighted
mean) — then any chunk width, a `lax.scan` over chunks or a `psum` over devices computes it — or
needs **every message at once** (`reduce` alone: a coordinate-wise median) — then the executor
must hold the whole cohort in one block.

Weights reach an aggregator already normalised over the cohort (p_i = w_i / Σw, computed
before any client runs), with non-finite clients' weights zeroed and their messages replaced by
zeros. With one client p = 1, so the mean is that client's message bit for bit.

A **contextual** aggregator also receives a `Context` (the server model the messages moved
from, the messages' client ids, the round's aggregation key) as the last argument of `add` /
`reduce`: norm bounding must bound the *delta* message − server, and attacks (`attacks`)
must know which clients are malicious. The robust aggregators live in `robust`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from fedjax_lm.federated.state import PyTree


class Aggregate(NamedTuple):
    """The reduced message; `value` is zeros where no client contributed (`weight == 0`)."""

    value: PyTree
    weight: jax.Array  # Σ p_i over the contributing clients


@dataclasses.dataclass(frozen=True)
class Aggregator:
    """`reduce(messages[C], p[C]) -> Aggregate`; decomposable ones also chunk-sum.
    Contextual ones take a trailing `Context` in `add` and `reduce`."""

    name: str
    reduce: Callable[..., Aggregate]
    init: Callable[[PyTree], PyTree] | None = None  # message template -> zero partial sums
    add: Callable[..., PyTree] | None = None  # (partial, chunk [K, ...], p[K]) -> partial
    finalize: Callable[[PyTree], Aggregate] | None = None
    contextual: bool = False

    @property
    def decomposable(self) -> bool:
        return self.add is not None


class Context(NamedTuple):
    """What a contextual aggregator knows beside the messages."""

    reference: PyTree  # the server params this round started from (message − reference = Δ)
    client_ids: jax.Array  # [C] population ids of the messages' clients (padding: weight 0)
    key: jax.Array  # the round's aggregation key (attacks' noise)


def context_args(aggregator: Aggregator, context: Context) -> tuple:
    """`(context,)` for a contextual aggregator, else `()`: `agg.add(partial, m, p, *args)`."""
    return (context,) if aggregator.contextual else ()


def normalize_weights(weights: jax.Array) -> jax.Array:
    """p = w / Σw; all-zero weights (no real data at all) stay zero."""
    total = jnp.sum(weights)
    return weights / jnp.where(total > 0, total, 1.0)


class WeightedSum(NamedTuple):
    """Running Σ p_i x_i and Σ p_i (a pytree: can be scanned, psum'ed and donated)."""

    total: PyTree
    weight: jax.Array


def _zero_sums(template: PyTree) -> WeightedSum:
    return WeightedSum(jax.tree.map(jnp.zeros_like, template), jnp.zeros((), jnp.float32))


def _add_weighted(partial: WeightedSum, messages: PyTree, p: jax.Array) -> WeightedSum:
    total = jax.tree.map(lambda a, x: a + jnp.tensordot(p.astype(x.dtype), x, axes=1),
                         partial.total, messages)
    return WeightedSum(total, partial.weight + jnp.sum(p))


def _chunk_sum_aggregator(name: str, finalize: Callable[[WeightedSum], Aggregate]) -> Aggregator:
    """An aggregator over the running Σ p_i x_i, Σ p_i: any chunk width gives the same sums."""

    def reduce(messages: PyTree, p: jax.Array) -> Aggregate:
        template = jax.tree.map(lambda x: x[0], messages)
        return finalize(_add_weighted(_zero_sums(template), messages, p))

    return Aggregator(name, reduce, _zero_sums, _add_weighted, finalize)


def weighted_mean() -> Aggregator:
    """Σ p_i x_i / Σ p_i: FedAvg's aggregate; decomposes into chunk sums."""

    def finalize(partial: WeightedSum) -> Aggregate:
        has_any = partial.weight > 0
        denom = jnp.where(has_any, partial.weight, 1.0)
        value = jax.tree.map(lambda x: jnp.where(has_any, x / denom.astype(x.dtype), 0),
                             partial.total)
        return Aggregate(value, partial.weight)

    return _chunk_sum_aggregator("mean", finalize)


def fixed_mean(denominator: float) -> Aggregator:
    """Σ p_i x_i / `denominator`: DP-FedAvg's estimator (McMahan et al. 2018). The denominator
    (the expected cohort size) does not depend on who took part, so adding or removing one
    client moves the result by at most its clipped norm / denominator."""
    if not denominator > 0:
        raise ValueError(f"the fixed denominator must be > 0, got {denominator}")

    def finalize(partial: WeightedSum) -> Aggregate:
        value = jax.tree.map(lambda x: x / jnp.asarray(denominator, x.dtype), partial.total)
        return Aggregate(value, partial.weight)

    return _chunk_sum_aggregator("fixed_mean", finalize)


def coordinate_median() -> Aggregator:
    """The coordinate-wise median of the contributing clients' messages (weights only select
    who contributes). Robust to a minority of outliers; needs every message at once."""

    def reduce(messages: PyTree, p: jax.Array) -> Aggregate:
        live = p > 0

        def median(x):
            keep = live.reshape((-1,) + (1,) * (x.ndim - 1))
            m = jnp.nanmedian(jnp.where(keep, x, jnp.nan), axis=0)
            return jnp.where(jnp.any(live), m, 0).astype(x.dtype)

        return Aggregate(jax.tree.map(median, messages), jnp.sum(p))

    return Aggregator("median", reduce)
