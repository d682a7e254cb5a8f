"""The pytrees that cross the engine's boundary: server state and per-round results."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
from flax import struct

Params = Any  # a pytree of arrays
PyTree = Any


@struct.dataclass
class ServerState:
    """Everything needed to continue a federated run: a pure pytree, so it can be
    jitted, donated, sharded (replicated) and checkpointed as one object.

    `rng` is the run's base key; round `r` derives every random draw from
    `fold_in(rng, r)`, so a resumed run replays exactly the same randomness.
    """

    params: Params
    opt_state: PyTree
    round: jax.Array  # int32 scalar: rounds completed so far
    rng: jax.Array  # typed PRNG key


@struct.dataclass
class ClientResult:
    """What one client's local training produces (stacked along axis 0 when vmapped)."""

    params: Params  # the client's final local params
    opt_state: PyTree  # its final optimizer state (kept when client state is carried)
    loss: jax.Array  # mean training loss over the real examples it processed
    num_examples: jax.Array  # real examples processed (padding excluded)
    num_steps: jax.Array  # local steps taken (all-padding steps are skipped)


class RoundMetrics(NamedTuple):
    """Per-round metrics; per-client arrays are indexed like the round's cohort."""

    loss: jax.Array  # example-weighted mean train loss over the cohort
    client_loss: jax.Array  # [C]
    client_examples: jax.Array  # [C]
    client_update_norm: jax.Array  # [C] ||client params - server params||
    client_finite: jax.Array  # [C] False where the client's update had NaN/Inf (excluded)
    update_norm: jax.Array  # ||new server params - old server params||


class RoundResult(NamedTuple):
    state: ServerState
    metrics: RoundMetrics
    client_states: PyTree | None  # [C, ...] carried client optimizer states, or None
