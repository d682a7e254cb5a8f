"""Deterministic per-round randomness: everything in round r comes from fold_in(rng, r).

Client keys are derived from the client's *population id*, not its position in the
cohort, so padding, chunking, sharding and the loop backend all give every client the
same key.
"""

from __future__ import annotations

import jax
import numpy as np

_CLIENT_STREAM = 0
_SAMPLING_STREAM = 1
_AGGREGATION_STREAM = 2


def round_key(rng: jax.Array, round_index: int | jax.Array) -> jax.Array:
    return jax.random.fold_in(rng, round_index)


def client_key(rng: jax.Array, round_index: int | jax.Array, client_id: int | jax.Array):
    """The key client `client_id` trains with in round `round_index`."""
    base = jax.random.fold_in(round_key(rng, round_index), _CLIENT_STREAM)
    return jax.random.fold_in(base, client_id)


def aggregation_key(rng: jax.Array, round_index: int | jax.Array) -> jax.Array:
    """The key a contextual aggregator draws with in round `round_index` (e.g. attack noise)."""
    return jax.random.fold_in(round_key(rng, round_index), _AGGREGATION_STREAM)


def sampling_key(rng: jax.Array, round_index: int) -> jax.Array:
    return jax.random.fold_in(round_key(rng, round_index), _SAMPLING_STREAM)


def sample_clients(key: jax.Array, num_clients: int, cohort_size: int) -> np.ndarray:
    """m of N client ids, uniformly without replacement, sorted (order is irrelevant to
    the math and sorted ids make data gathering cache friendly)."""
    if not 0 < cohort_size <= num_clients:
        raise ValueError(
            f"cohort size must be in [1, {num_clients}] (the number of clients), got {cohort_size}"
        )
    ids = jax.random.choice(key, num_clients, (cohort_size,), replace=False)
    return np.sort(np.asarray(ids))
