"""The named pytrees that cross the round's boundary: server state, cohort, outputs."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
from flax import struct

Params = Any  # a pytree of arrays
PyTree = Any


@struct.dataclass
class ServerState:
    """Everything needed to continue a federated run: a pure pytree, so it can be
    jitted, donated, sharded (replicated), scanned over and checkpointed as one object.

    `opt_state` is the algorithm's server-side state (a server optimizer's moments,
    SCAFFOLD's control variate, ...). `rng` is the run's base key; round `r` derives every
    random draw from `fold_in(rng, r)`, so a resumed run replays the same randomness.
    """

    params: Params
    opt_state: PyTree
    round: jax.Array  # int32 scalar: rounds completed so far
    rng: jax.Array  # typed PRNG key


@struct.dataclass
class Cohort:
    """One round's clients, stacked on axis 0.

    `data` leaves are `[C, S, B, ...]` with an example mask `data["mask"]` `[C, S, B]`;
    `client_ids` are population ids (they pick each client's key and its stored state);
    `weights` are raw aggregation weights (the round normalises them over the cohort);
    `client_states` is the cohort's carried state `[C, ...]`, or None.
    """

    data: dict[str, Any]
    client_ids: jax.Array  # [C] int32
    weights: jax.Array  # [C] float32
    client_states: PyTree | None = None


class ClientInfo(NamedTuple):
    """What the hooks know about the client they run for."""

    id: jax.Array  # population id (int32 scalar)
    key: jax.Array  # this client's key in this round
    weight: jax.Array  # its normalised aggregation weight p_i (Σ over the cohort = 1)
    state: PyTree | None  # its carried state, or None for a stateless algorithm


class ClientOutput(NamedTuple):
    """What `client_final` hands the server for one client."""

    message: PyTree  # what the aggregator reduces over the client axis
    weight: jax.Array  # its aggregation weight (usually `ClientInfo.weight`)
    client_state: PyTree | None  # its new carried state, or None
    update_norm: jax.Array  # ‖the client's model change‖, for monitoring


class ClientMetrics(NamedTuple):
    """Per-client numbers of one round (stacked `[C]` over the cohort)."""

    loss: jax.Array  # mean training loss over its real examples
    examples: jax.Array  # real examples processed (padding excluded)
    update_norm: jax.Array
    finite: jax.Array  # False where its message had a NaN/Inf (then it is excluded)


class RoundMetrics(NamedTuple):
    """Per-round metrics; per-client arrays are indexed like the round's cohort."""

    loss: jax.Array  # example-weighted mean train loss over the cohort
    client_loss: jax.Array  # [C]
    client_examples: jax.Array  # [C]
    client_update_norm: jax.Array  # [C] ‖client model − server model‖
    client_finite: jax.Array  # [C] False where the client's update had NaN/Inf (excluded)
    update_norm: jax.Array  # ‖new server params − old server params‖


class RoundOutputs(NamedTuple):
    """What a round returns beside the next server state."""

    metrics: RoundMetrics
    client_states: PyTree | None  # [C, ...] the cohort's new carried states, or None


class RoundResult(NamedTuple):
    """The host driver's result: the next state, metrics and carried client states."""

    state: ServerState
    metrics: RoundMetrics
    client_states: PyTree | None
