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
_NOISE_STREAM = 3


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


def noise_key(rng: jax.Array, round_index: int | jax.Array) -> jax.Array:
    """The server's noise key of round `round_index` (drawn once per round, in the server
    update, so every executor adds the same noise)."""
    return jax.random.fold_in(round_key(rng, round_index), _NOISE_STREAM)


def sample_clients(key: jax.Array, num_clients: int, cohort_size: int) -> np.ndarray:
    """m of N client ids, uniformly without replacement, sorted (order is irrelevant to
    the math and sorted ids make data gathering cache friendly)."""
    if not 0 < cohort_size <= num_clients:
        raise ValueError(
            f"cohort size must be in [1, {num_clients}] (the number of clients), got {cohort_size}"
        )
    ids = jax.random.choice(key, num_clients, (cohort_size,), replace=False)
    return np.sort(np.asarray(ids))


def poisson_clients(key: jax.Array, num_clients: int, rate: float,
                    max_size: int) -> tuple[np.ndarray, int]:
    """Poisson sampling, as DP accountants assume: each client joins independently with
    probability `rate`. Beyond `max_size` a uniformly random `max_size` of them are kept;
    returns (sorted ids, how many were dropped)."""
    if not 0 < rate <= 1:
        raise ValueError(f"the sampling rate must be in (0, 1], got {rate}")
    if not 1 <= max_size <= num_clients:
        raise ValueError(f"max_size must be in [1, {num_clients}], got {max_size}")
    join_key, keep_key = jax.random.split(key)
    joined = np.flatnonzero(np.asarray(jax.random.uniform(join_key, (num_clients,)) < rate))
    dropped = max(0, len(joined) - max_size)
    if dropped:
        keep = jax.random.choice(keep_key, len(joined), (max_size,), replace=False)
        joined = np.sort(joined[np.asarray(keep)])
    return joined, dropped


def pad_cohort(ids: np.ndarray, num_clients: int, size: int) -> np.ndarray:
    """`ids` followed by the smallest ids not in it, `size` in all: distinct filler clients
    for a fixed-size cohort (the caller zeroes their data, so they weigh 0)."""
    if len(ids) > size or size > num_clients:
        raise ValueError(f"cannot pad {len(ids)} clients to {size} of {num_clients}")
    fillers = np.setdiff1d(np.arange(num_clients), ids)[: size - len(ids)]
    return np.concatenate([np.asarray(ids, np.int64), fillers]).astype(np.int64)
