"""Population-sized client state (control variates, optimizer state, personal heads).

It lives in host memory, one row per population client: the round's cohort is gathered from
it and written back after the round, so device memory holds only the cohort's rows. It is a
plain pytree of numpy arrays, checkpointed beside the server state (resume is bitwise).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np

from fedjax_lm.federated.state import Params, PyTree


class ClientStateStore:
    """`store.gather(ids)` → the cohort's `[C, ...]` rows; `store.scatter(ids, rows)`."""

    def __init__(self, states: PyTree):
        self.states = jax.tree.map(np.array, states)  # own, writable host copies
        sizes = {x.shape[0] for x in jax.tree.leaves(self.states)}
        if len(sizes) > 1:
            raise ValueError(f"every leaf needs the same population axis, got sizes {sizes}")
        self.population_size = sizes.pop() if sizes else 0

    @classmethod
    def create(cls, init: Callable[[Params], PyTree], params: Params,
               population_size: int) -> ClientStateStore:
        """Every client starts from `init(params)`."""
        one = jax.tree.map(np.asarray, init(params))
        return cls(jax.tree.map(lambda x: np.broadcast_to(x, (population_size,) + x.shape),
                                one))

    def _check(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids)
        if ids.size and (ids.min() < 0 or ids.max() >= self.population_size):
            raise ValueError(f"client ids must be in [0, {self.population_size}), got "
                             f"{ids.min()}..{ids.max()}")
        return ids

    def gather(self, ids) -> PyTree:
        ids = self._check(ids)
        return jax.tree.map(lambda x: x[ids], self.states)

    def scatter(self, ids, rows: PyTree) -> None:
        ids = self._check(ids)

        def write(store, new):
            store[ids] = np.asarray(new)

        jax.tree.map(write, self.states, rows)
