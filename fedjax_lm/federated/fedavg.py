"""FedAvg and its family as hooks: FedOpt (any server optimizer), FedProx, carried client
optimizer state, paper 1's per-client head initialisation and parameter-efficient clients.

With a `trainable` mask (see `trainable`) a client carries, trains and sends only the trainable
leaves (and their optimizer state); the frozen leaves are read from the broadcast server state,
so under `vmap` they have no client axis and get no gradient. The server optimizer sees only the
trainable leaves; the frozen ones stay bit for bit.

The message is the client's final model, so with one client (p = 1) the weighted mean is that
model bit for bit; the server optimizer then sees the pseudo-gradient −Δ = x − mean.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import optax

from fedjax_lm.federated.aggregate import Aggregate, Aggregator, weighted_mean
from fedjax_lm.federated.algorithm import Algorithm, LossFn
from fedjax_lm.federated.server import ServerOptimizer
from fedjax_lm.federated.state import ClientInfo, ClientOutput, Params, PyTree, ServerState
from fedjax_lm.federated.trainable import (
    ClientMask,
    Trainable,
    apply_client_mask,
    merge,
    split,
    trainable_part,
    with_trainable,
)
from fedjax_lm.federated.tree import squared_distance, tree_distance, tree_select

# (server params, client id) -> that client's starting params (e.g. its own random head).
ClientParamsInit = Callable[[Params, jax.Array], Params]


class LocalCarry(NamedTuple):
    params: Params  # the trainable leaves under PEFT
    opt_state: PyTree
    client_id: jax.Array | None = None  # kept only for a `client_mask`


def server_optimizer_init(server_optimizer: ServerOptimizer, params: Params) -> PyTree:
    return () if server_optimizer is None else server_optimizer.init(params)


def server_step(
    server_optimizer: ServerOptimizer, params: Params, opt_state: PyTree, aggregate: Aggregate
) -> tuple[Params, PyTree]:
    """Move the server model towards the mean client model: exactly to it for FedAvg (None),
    else one optimizer step on −Δ. No contributing client: the model stays. `params` and
    the aggregate hold the same leaves (the trainable ones under PEFT)."""
    mean = tree_select(aggregate.weight > 0, aggregate.value, params)
    if server_optimizer is None:
        return mean, opt_state
    pseudo_grad = jax.tree.map(lambda s, m: s - m, params, mean)  # = −Δ
    updates, opt_state = server_optimizer.update(pseudo_grad, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


def starting_params(server: ServerState, client: ClientInfo,
                    client_params_init: ClientParamsInit | None) -> Params:
    """The server model, or in round 0 the client's own start when a hook is given."""
    if client_params_init is None:
        return server.params
    return jax.lax.cond(server.round == 0, lambda p: client_params_init(p, client.id),
                        lambda p: p, server.params)


def make_grad_fn(loss_fn: LossFn, prox_mu: float, trainable: Trainable | None = None):
    """value_and_grad of the local objective w.r.t. the trainable leaves; FedProx adds
    (μ/2)·‖w − w_server‖² over them. `server_params` is the whole server model: the frozen
    leaves come from it (no gradient, no client axis)."""

    def objective(params, server_params, batch, rng):
        anchor = server_params
        if trainable is not None:
            anchor, frozen = split(trainable, server_params)
            params = merge(trainable, params, frozen)
        loss, _ = loss_fn(params, batch, rng)
        total = loss
        if prox_mu:
            total = loss + 0.5 * prox_mu * squared_distance(trainable_part(trainable, params),
                                                            anchor)
        return total, loss

    return jax.value_and_grad(objective, has_aux=True)


def fedavg(
    loss_fn: LossFn,
    client_optimizer: optax.GradientTransformation,
    server_optimizer: ServerOptimizer = None,
    *,
    prox_mu: float = 0.0,
    carry_optimizer_state: bool = False,
    client_params_init: ClientParamsInit | None = None,
    aggregator: Aggregator | None = None,
    trainable: Trainable | None = None,
    client_mask: ClientMask | None = None,
) -> Algorithm:
    """FedAvg (McMahan et al. 2017); with a server optimizer FedAvgM / FedAdam / FedYogi /
    FedAdagrad (Reddi et al. 2021); with `prox_mu > 0` FedProx (Li et al. 2020).

    `carry_optimizer_state` keeps each client's optimizer state across rounds (stateful
    clients); `client_params_init` gives each client its own start in round 0.
    `trainable` (a bool mask over the params) makes clients parameter-efficient: only those
    leaves are carried, trained, sent and updated; `client_mask(trainable params, id)` zeroes
    a client's components (start, gradient, message), e.g. LoRA ranks above its own.
    """
    if prox_mu < 0:
        raise ValueError(f"FedProx mu must be >= 0, got {prox_mu}")
    grad_fn = make_grad_fn(loss_fn, prox_mu, trainable)

    def part(params):
        return trainable_part(trainable, params)

    def client_init(server, client):
        params = part(starting_params(server, client, client_params_init))
        params = apply_client_mask(client_mask, params, params, client.id)
        opt_state = client.state if carry_optimizer_state else client_optimizer.init(params)
        return LocalCarry(params, opt_state, None if client_mask is None else client.id)

    def local_step(server, carry, batch, key):
        (_, loss), grads = grad_fn(carry.params, server.params, batch, key)
        # Masked components get a zero gradient: with any optax optimizer they stay zero.
        grads = apply_client_mask(client_mask, grads, carry.params, carry.client_id)
        updates, opt_state = client_optimizer.update(grads, carry.opt_state, carry.params)
        params = optax.apply_updates(carry.params, updates)
        return LocalCarry(params, opt_state, carry.client_id), loss

    def client_final(server, carry, client):
        return ClientOutput(
            message=carry.params,
            weight=client.weight,
            client_state=carry.opt_state if carry_optimizer_state else None,
            update_norm=tree_distance(carry.params, part(server.params)),
        )

    def server_update(server, aggregate):
        params, opt_state = server_step(server_optimizer, part(server.params),
                                        server.opt_state, aggregate)
        return server.replace(params=with_trainable(trainable, server.params, params),
                              opt_state=opt_state)

    def client_state_init(params):
        return client_optimizer.init(part(params))

    return Algorithm(
        name="fedprox" if prox_mu else "fedavg",
        server_init=lambda params: server_optimizer_init(server_optimizer, part(params)),
        client_init=client_init,
        local_step=local_step,
        client_final=client_final,
        server_update=server_update,
        aggregator=aggregator or weighted_mean(),
        client_state_init=client_state_init if carry_optimizer_state else None,
        message_reference=None if trainable is None else lambda server: part(server.params),
    )
