"""SCAFFOLD (Karimireddy et al. 2020, option II control variates) as hooks.

Each client i keeps a control variate c_i (carried state, zeros at first); the server keeps
c. Local SGD steps follow the corrected gradient g − c_i + c. After K real steps with
learning rate η the client sets c_i⁺ = c_i − c + (x − y_i) / (K η) and sends its model y_i
and Δc_i = c_i⁺ − c_i. The server moves x towards the mean model exactly like FedAvg (so a
server optimizer works unchanged) and sets c ← c + (|S| / N) · mean Δc_i.

With uniform weighting (`weighting="uniform"`) the means are the paper's plain averages and c
stays the population mean of the c_i; with example weighting both means are example-weighted.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from fedjax_lm.federated.aggregate import Aggregate
from fedjax_lm.federated.algorithm import Algorithm, LossFn
from fedjax_lm.federated.fedavg import (
    make_grad_fn,
    server_optimizer_init,
    server_step,
    starting_params,
)
from fedjax_lm.federated.server import ServerOptimizer
from fedjax_lm.federated.state import ClientOutput, Params, PyTree
from fedjax_lm.federated.tree import tree_distance, tree_sub, tree_zeros_like


class ScaffoldServer(NamedTuple):
    optimizer: PyTree  # the server optimizer's state (() for plain averaging)
    control: Params  # c


class ScaffoldCarry(NamedTuple):
    params: Params  # y_i
    correction: Params  # c − c_i, fixed during the round
    steps: jax.Array  # K: real local steps taken


class ScaffoldMessage(NamedTuple):
    params: Params  # y_i
    control_delta: Params  # Δc_i


def scaffold(
    loss_fn: LossFn,
    learning_rate: float,
    server_optimizer: ServerOptimizer = None,
    *,
    cohort_fraction: float = 1.0,
    client_params_init=None,
) -> Algorithm:
    """SCAFFOLD with local SGD at `learning_rate` (η). `cohort_fraction` is |S| / N, the
    sampled share of the population."""
    if learning_rate <= 0:
        raise ValueError(f"SCAFFOLD needs a learning rate > 0, got {learning_rate}")
    if not 0 < cohort_fraction <= 1:
        raise ValueError(f"cohort_fraction must be in (0, 1], got {cohort_fraction}")
    grad_fn = make_grad_fn(loss_fn, 0.0)

    def client_init(server, client):
        params = starting_params(server, client, client_params_init)
        correction = tree_sub(server.opt_state.control, client.state)
        return ScaffoldCarry(params, correction, jnp.zeros((), jnp.int32))

    def local_step(server, carry, batch, key):
        (_, loss), grads = grad_fn(carry.params, server.params, batch, key)
        params = jax.tree.map(lambda y, g, d: y - learning_rate * (g + d),
                              carry.params, grads, carry.correction)
        return carry._replace(params=params, steps=carry.steps + 1), loss

    def client_final(server, carry, client):
        k_eta = jnp.maximum(carry.steps, 1).astype(jnp.float32) * learning_rate
        # Option II: c_i⁺ = c_i − c + (x − y) / (K η) = (x − y) / (K η) − correction.
        new_control = jax.tree.map(lambda x, y, d: (x - y) / k_eta.astype(x.dtype) - d,
                                   server.params, carry.params, carry.correction)
        new_control = jax.tree.map(lambda new, old: jnp.where(carry.steps > 0, new, old),
                                   new_control, client.state)
        return ClientOutput(
            message=ScaffoldMessage(carry.params, tree_sub(new_control, client.state)),
            weight=client.weight,
            client_state=new_control,
            update_norm=tree_distance(carry.params, server.params),
        )

    def server_update(server, aggregate: Aggregate):
        models = Aggregate(aggregate.value.params, aggregate.weight)
        params, opt = server_step(server_optimizer, server.params, server.opt_state.optimizer,
                                  models)
        control = jax.tree.map(lambda c, dc: c + cohort_fraction * dc,
                               server.opt_state.control, aggregate.value.control_delta)
        return server.replace(params=params, opt_state=ScaffoldServer(opt, control))

    return Algorithm(
        name="scaffold",
        server_init=lambda p: ScaffoldServer(server_optimizer_init(server_optimizer, p),
                                             tree_zeros_like(p)),
        client_init=client_init,
        local_step=local_step,
        client_final=client_final,
        server_update=server_update,
        client_state_init=tree_zeros_like,
    )


