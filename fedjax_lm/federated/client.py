"""One client's local training: a `lax.scan` over its S local steps.

The function is written for a single client; backends add the client axis with
`vmap` (or a Python loop), so the math is identical everywhere.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from fedjax_lm.federated.state import ClientResult, Params, PyTree

LossFn = Callable[[Params, dict, jax.Array], tuple[jax.Array, dict]]
ClientUpdateFn = Callable[[Params, Any, dict, jax.Array], ClientResult]


def tree_select(pred: jax.Array, on_true: PyTree, on_false: PyTree) -> PyTree:
    """Leaf-wise `where` with a scalar predicate (vmap-friendly, unlike `lax.cond`)."""
    return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


def squared_distance(a: Params, b: Params) -> jax.Array:
    leaves = jax.tree.leaves(jax.tree.map(lambda x, y: jnp.sum(jnp.square(x - y)), a, b))
    return sum(leaves, jnp.zeros((), jnp.float32))


def make_client_update(
    loss_fn: LossFn, optimizer: optax.GradientTransformation, *, prox_mu: float = 0.0
) -> ClientUpdateFn:
    """Build `client_update(server_params, opt_state, data, rng) -> ClientResult`.

    `data` leaves are `[S, B, ...]` with an example mask `data["mask"]` of shape `[S, B]`.
    `opt_state=None` starts a fresh client optimizer from the server params (the default
    per round); passing a state carries it across rounds. A step whose batch is all padding
    changes neither params nor optimizer state: Adam would otherwise still move on its
    momentum. FedProx adds (μ/2)·||w − w_server||² to every local loss.
    """

    def local_objective(params, server_params, batch, rng):
        loss, _ = loss_fn(params, batch, rng)
        total = loss
        if prox_mu:
            total = loss + 0.5 * prox_mu * squared_distance(params, server_params)
        return total, loss

    grad_fn = jax.value_and_grad(local_objective, has_aux=True)

    def client_update(server_params, opt_state, data, rng):
        if opt_state is None:
            opt_state = optimizer.init(server_params)
        num_steps = data["mask"].shape[0]
        # fold_in, not split: step t's key must not depend on how many steps follow.
        step_keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(rng, jnp.arange(num_steps))

        def step(carry, inputs):
            params, opt_state, loss_sum, examples, steps = carry
            batch, key = inputs
            n = jnp.sum(batch["mask"].astype(jnp.float32))
            (_, loss), grads = grad_fn(params, server_params, batch, key)
            updates, new_opt_state = optimizer.update(grads, opt_state, params)
            new_params = optax.apply_updates(params, updates)
            active = n > 0
            carry = (
                tree_select(active, new_params, params),
                tree_select(active, new_opt_state, opt_state),
                loss_sum + jnp.where(active, loss * n, 0.0),
                examples + n,
                steps + active.astype(jnp.int32),
            )
            return carry, None

        zero = jnp.zeros((), jnp.float32)
        init = (server_params, opt_state, zero, zero, jnp.zeros((), jnp.int32))
        (params, opt_state, loss_sum, examples, steps), _ = jax.lax.scan(
            step, init, (data, step_keys)
        )
        return ClientResult(
            params=params,
            opt_state=opt_state,
            loss=loss_sum / jnp.maximum(examples, 1.0),
            num_examples=examples,
            num_steps=steps,
        )

    return client_update
