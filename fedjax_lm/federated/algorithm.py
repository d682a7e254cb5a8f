"""A federated algorithm as a few pure hooks over ONE client; executors add the client axis.

    server_init(params)                   -> the algorithm's server state (`opt_state`)
    client_init(server, client)           -> carry  (`ClientInfo`: id, key, weight, state)
    local_step(server, carry, batch, key) -> (carry, loss)
    client_final(server, carry, client)   -> ClientOutput(message, weight, client_state, norm)
    aggregator                            reduces the messages over the client axis
    server_update(server, aggregate)      -> the server state with new params / opt_state

`train_client` runs them for one client: a `lax.scan` over its S local steps in which a step
whose batch is all padding changes nothing (Adam would otherwise still move on its momentum).
FedAvg, FedOpt, FedProx and SCAFFOLD are choices of these hooks, never new loops.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fedjax_lm.federated.aggregate import Aggregate, Aggregator, weighted_mean
from fedjax_lm.federated.state import ClientInfo, ClientOutput, Params, PyTree, ServerState
from fedjax_lm.federated.tree import tree_select

Carry = Any
Batch = dict[str, jax.Array]
LossFn = Callable[[Params, Batch, jax.Array], tuple[jax.Array, dict]]


@dataclasses.dataclass(frozen=True)
class Algorithm:
    """The hooks of one federated algorithm (see the module docstring)."""

    name: str
    server_init: Callable[[Params], PyTree]
    client_init: Callable[[ServerState, ClientInfo], Carry]
    local_step: Callable[[ServerState, Carry, Batch, jax.Array], tuple[Carry, jax.Array]]
    client_final: Callable[[ServerState, Carry, ClientInfo], ClientOutput]
    server_update: Callable[[ServerState, Aggregate], ServerState]
    aggregator: Aggregator = dataclasses.field(default_factory=weighted_mean)
    # One client's fresh carried state from the server params; None: the algorithm is stateless.
    client_state_init: Callable[[Params], PyTree] | None = None
    # The server-side counterpart of a message (what `message − reference` is a delta from):
    # the server params, or under PEFT only their trainable leaves. None: `server.params`.
    message_reference: Callable[[ServerState], PyTree] | None = None

    def reference(self, server: ServerState) -> PyTree:
        """What the clients' messages moved away from this round (norm bounds, attacks, DP)."""
        return server.params if self.message_reference is None else self.message_reference(server)

    @property
    def stateful(self) -> bool:
        return self.client_state_init is not None


def init_state(algorithm: Algorithm, params: Params, rng: jax.Array) -> ServerState:
    """The round-0 server state: the model, the algorithm's server state, a typed key."""
    if not jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        rng = jax.random.wrap_key_data(rng) if rng.ndim else jax.random.key(rng)
    return ServerState(params=params, opt_state=algorithm.server_init(params),
                       round=jnp.zeros((), jnp.int32), rng=rng)


class TrainedClient(NamedTuple):
    """`train_client`'s result: the hooks' output and the loop's own counts."""

    output: ClientOutput
    loss: jax.Array  # mean loss over the client's real examples
    examples: jax.Array  # its real examples (padding excluded)


def train_client(
    algorithm: Algorithm, server: ServerState, client: ClientInfo, data: Batch
) -> TrainedClient:
    """One client's round: init, a `lax.scan` over its `[S, B, ...]` batches, final.

    Step t uses `fold_in(client.key, t)`: a step's key never depends on how many follow.
    """
    num_steps = data["mask"].shape[0]
    step_keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(client.key, jnp.arange(num_steps))

    def step(carry, inputs):
        state, loss_sum, examples = carry
        batch, key = inputs
        n = jnp.sum(batch["mask"].astype(jnp.float32))
        new_state, loss = algorithm.local_step(server, state, batch, key)
        active = n > 0
        carry = (
            tree_select(active, new_state, state),
            loss_sum + jnp.where(active, loss * n, 0.0),
            examples + n,
        )
        return carry, None

    zero = jnp.zeros((), jnp.float32)
    init = (algorithm.client_init(server, client), zero, zero)
    (state, loss_sum, examples), _ = jax.lax.scan(step, init, (data, step_keys))
    output = algorithm.client_final(server, state, client)
    return TrainedClient(output, loss_sum / jnp.maximum(examples, 1.0), examples)
