"""Many federations in one program: a leading federation axis F over whole server states,
cohorts and the hyperparameters that differ between them (learning rates, keys).

    program = FederationRound(lambda hp: fedavg(loss_fn, optax.sgd(hp["lr"])), width)
    states, outputs = program(states, cohorts, hypers)   # states / hypers: leaves [F, ...]

Each federation runs exactly the single-federation round (`round.blocks_round`) on its own
state, cohort and hyperparameters; `jax.vmap` adds the F axis, so F federations compile once.
Cohorts of different sizes share the program by padding: a smaller cohort gets zero-weight
clients (a smaller C is a larger padded axis) and all-padding local steps, which change
nothing (`algorithm.train_client` skips a step with no real example). Model-agnostic: the
algorithm is built inside the trace from the federation's hyperparameters (`algorithm_fn`).

Parameter-efficient federations fine-tune the same frozen base: a `shared` mask names params
leaves that are equal in every federation and that the algorithm never changes (`common_leaves`
finds them). They enter the program once, unbatched through the federation `vmap` as the base
already is through the client one, instead of F copies (`split_shared` / `join_shared`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from fedjax_lm.federated import placement
from fedjax_lm.federated import round as rnd
from fedjax_lm.federated.algorithm import Algorithm
from fedjax_lm.federated.state import Cohort, PyTree, RoundOutputs, ServerState
from fedjax_lm.federated.trainable import Trainable, merge, split

Hypers = PyTree  # one federation's traced hyperparameters (a pytree of scalars / keys)
AlgorithmFn = Callable[[Hypers], Algorithm]


def pad_cohort(cohort: Cohort, num_clients: int, num_steps: int) -> Cohort:
    """Host side: pad `[C, S, B, ...]` to `num_clients` zero-weight clients and `num_steps`
    all-padding local steps (neither changes the federation's numbers)."""
    def steps(x):
        return np.pad(x, [(0, 0), (0, num_steps - x.shape[1])] + [(0, 0)] * (x.ndim - 2))

    data = {k: steps(np.asarray(v)) for k, v in cohort.data.items()}
    padded = cohort.replace(data=data, client_ids=np.asarray(cohort.client_ids),
                            weights=np.asarray(cohort.weights))
    return jax.tree.map(lambda x: rnd.pad_axis0(x, num_clients), padded)


def stack(trees: list[PyTree]) -> PyTree:
    """Stack same-structured trees on a new leading federation axis (keys included)."""
    return jax.tree.map(lambda *xs: jax.numpy.stack(xs), *trees)


@functools.partial(jax.jit, static_argnums=1)
def unstack(tree: PyTree, count: int) -> list[PyTree]:
    """The F federations of a stacked tree, in one dispatch."""
    return [jax.tree.map(lambda x, i=i: x[i], tree) for i in range(count)]


def common_leaves(params: list[PyTree], candidates: Trainable) -> Trainable:
    """The `candidates` leaves (a bool mask: e.g. the frozen ones) that are bitwise equal in
    every federation's `params`: what a `shared` program may take once."""
    flags, treedef = jax.tree.flatten(candidates)
    columns = zip(*(jax.tree.leaves(p) for p in params), strict=True)
    return jax.tree.unflatten(treedef, [  # compared where they live (no device-to-host copy)
        bool(flag) and all(x is xs[0] or bool(jax.numpy.array_equal(x, xs[0])) for x in xs[1:])
        for flag, xs in zip(flags, columns, strict=True)])


def split_shared(shared: Trainable | None, states: list[ServerState]
                 ) -> tuple[ServerState, PyTree]:
    """(the states stacked on the federation axis without the shared leaves, those leaves
    once — the first state's copy); without a mask, (stacked states, None)."""
    if shared is None:
        return stack(states), None
    common = split(shared, states[0].params)[0]
    return stack([s.replace(params=split(shared, s.params)[1]) for s in states]), common


def join_shared(shared: Trainable | None, state: ServerState, common: PyTree) -> ServerState:
    """One federation's whole state from its own leaves and the shared ones."""
    return state if shared is None else state.replace(params=merge(shared, common, state.params))


class FederationRound:
    """`program(states, cohorts, hypers, common) -> (states, [RoundOutputs per federation])`.

    One compiled program per input shape (federations, padded clients, steps); `compile`
    returns it ahead of time, so a caller can read its memory analysis before any round runs.
    Stateless algorithms with a decomposable or whole-cohort aggregator; no carried client
    state (each federation would need its own store). With `shared`, `states` hold only each
    federation's own leaves and `common` the shared ones (`split_shared`); the algorithm must
    leave those unchanged (a PEFT mask's frozen leaves), since only one copy exists."""

    def __init__(self, algorithm_fn: AlgorithmFn, clients_per_chunk: int | None = None,
                 shared: Trainable | None = None):
        self.algorithm_fn = algorithm_fn
        self.clients_per_chunk = clients_per_chunk
        self.shared = shared
        self._jit = jax.jit(jax.vmap(self._one, in_axes=(0, None, 0, 0)), donate_argnums=(0,))
        self._compiled: dict[Any, Any] = {}

    def layout(self, num_clients: int) -> tuple[int, int]:
        """(block width K, padded C) of every federation's cohort."""
        return placement.layout(num_clients, self.clients_per_chunk, 1)

    def _one(self, state: ServerState, common: PyTree, blocks: Cohort, hypers: Hypers):
        algorithm = self.algorithm_fn(hypers)
        if algorithm.stateful:
            raise ValueError(f"algorithm {algorithm.name!r} carries client state, which a "
                             "federation axis cannot carry; run its federations one by one")
        keep = not algorithm.aggregator.decomposable
        step = functools.partial(rnd.train_block, algorithm, None, keep)
        state = join_shared(self.shared, state, common)
        state, loss, norm, outs = rnd.blocks_round(algorithm, step, state, blocks)
        if self.shared is not None:  # unchanged by the algorithm: the caller keeps its copy
            state = state.replace(params=split(self.shared, state.params)[1])
        return state, loss, norm, outs.metrics

    def place(self, cohorts: list[Cohort], num_steps: int | None = None) -> Cohort:
        """Host side: pad every cohort to the widest (clients and steps), block and stack."""
        clients = max(len(c.client_ids) for c in cohorts)
        steps = max([c.data["mask"].shape[1] for c in cohorts] + [num_steps or 0])
        width, padded = self.layout(clients)
        blocks = [rnd.to_blocks(pad_cohort(c, clients, steps), width, padded) for c in cohorts]
        return jax.tree.map(lambda *xs: np.stack(xs), *blocks)

    def compile(self, states: ServerState, blocks: Cohort, hypers: Hypers,
                common: PyTree = None):
        """The compiled program for these (stacked) shapes; cached."""
        spec = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                            (states, common, blocks, hypers))
        key = (jax.tree.structure(spec), tuple((x.shape, str(x.dtype))
                                               for x in jax.tree.leaves(spec)))
        if key not in self._compiled:
            self._compiled[key] = self._jit.lower(states, common, blocks, hypers).compile()
        return self._compiled[key]

    def __call__(self, states: ServerState, cohorts: list[Cohort], hypers: Hypers,
                 num_steps: int | None = None, common: PyTree = None
                 ) -> tuple[ServerState, list[RoundOutputs]]:
        """One round of every federation; `states` are donated, `common` is not."""
        if (common is None) != (self.shared is None):
            raise ValueError("a program with a `shared` mask takes the shared leaves as "
                             "`common` (see split_shared), and only such a program does")
        blocks = self.place(cohorts, num_steps)
        states, loss, norm, metrics = self.compile(states, blocks, hypers, common)(
            states, common, blocks, hypers)
        per = unstack((loss, norm, metrics), len(cohorts))
        outputs = []
        for (loss_f, norm_f, metrics_f), cohort in zip(per, cohorts, strict=True):
            size = len(cohort.client_ids)
            flat = jax.tree.map(lambda x, n=size: x.reshape((-1,) + x.shape[2:])[:n], metrics_f)
            outputs.append(rnd.round_outputs(loss_f, norm_f, flat, None))
        return states, outputs


def compiled_bytes(compiled) -> int:
    """Peak bytes XLA reports for a compiled program (arguments + outputs + temps − aliases)."""
    m = compiled.memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
               - m.alias_size_in_bytes)
