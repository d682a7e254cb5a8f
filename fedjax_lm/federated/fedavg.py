"""FedAvg and its family as hooks: FedOpt (any server optimizer), FedProx, carried client
optimizer state and paper 1's per-client head initialisation.

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
from fedjax_lm.federated.tree import squared_distance, tree_distance, tree_select

# (server params, client id) -> that client's starting params (e.g. its own random head).
ClientParamsInit = Callable[[Params, jax.Array], Params]


class LocalCarry(NamedTuple):
    params: Params
    opt_state: PyTree


def server_optimizer_init(server_optimizer: ServerOptimizer, params: Params) -> PyTree:
    return () if server_optimizer is None else server_optimizer.init(params)


def server_step(
    server_optimizer: ServerOptimizer, params: Params, opt_state: PyTree, aggregate: Aggregate
) -> tuple[Params, PyTree]:
    """Move the server model towards the mean client model: exactly to it for FedAvg (None),
    else one optimizer step on −Δ. No contributing client: the model stays."""
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


def make_grad_fn(loss_fn: LossFn, prox_mu: float):
    """value_and_grad of the local objective; FedProx adds (μ/2)·‖w − w_server‖²."""

    def objective(params, server_params, batch, rng):
        loss, _ = loss_fn(params, batch, rng)
        total = loss
        if prox_mu:
            total = loss + 0.5 * prox_mu * squared_distance(params, server_params)
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
) -> Algorithm:
    """FedAvg (McMahan et al. 2017); with a server optimizer FedAvgM / FedAdam / FedYogi /
    FedAdagrad (Reddi et al. 2021); with `prox_mu > 0` FedProx (Li et al. 2020).

    `carry_optimizer_state` keeps each client's optimizer state across rounds (stateful
    clients); `client_params_init` gives each client its own start in round 0.
    """
    if prox_mu < 0:
        raise ValueError(f"FedProx mu must be >= 0, got {prox_mu}")
    grad_fn = make_grad_fn(loss_fn, prox_mu)

    def client_init(server, client):
        params = starting_params(server, client, client_params_init)
        opt_state = client.state if carry_optimizer_state else client_optimizer.init(params)
        return LocalCarry(params, opt_state)

    def local_step(server, carry, batch, key):
        (_, loss), grads = grad_fn(carry.params, server.params, batch, key)
        updates, opt_state = client_optimizer.update(grads, carry.opt_state, carry.params)
        return LocalCarry(optax.apply_updates(carry.params, updates), opt_state), loss

    def client_final(server, carry, client):
        return ClientOutput(
            message=carry.params,
            weight=client.weight,
            client_state=carry.opt_state if carry_optimizer_state else None,
            update_norm=tree_distance(carry.params, server.params),
        )

    def server_update(server, aggregate):
        params, opt_state = server_step(server_optimizer, server.params, server.opt_state,
                                        aggregate)
        return server.replace(params=params, opt_state=opt_state)

    return Algorithm(
        name="fedprox" if prox_mu else "fedavg",
        server_init=lambda params: server_optimizer_init(server_optimizer, params),
        client_init=client_init,
        local_step=local_step,
        client_final=client_final,
        server_update=server_update,
        aggregator=aggregator or weighted_mean(),
        client_state_init=client_optimizer.init if carry_optimizer_state else None,
    )
