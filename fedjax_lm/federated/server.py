"""Server optimizers: optax transformations applied to the negated mean client delta.

Following Reddi et al. 2021 ("Adaptive Federated Optimization"), the server treats
Δ = mean(client params) − server params as a pseudo-gradient −Δ. FedAvg with server
learning rate 1 is represented by `None`: the new server model is exactly the weighted
mean of the client models (no x + (x̄ − x) rounding).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

ServerOptimizer = optax.GradientTransformation | None

SERVER_OPTIMIZERS = ("fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad")


class FedOptState(NamedTuple):
    m: optax.Updates
    v: optax.Updates


def scale_by_fedopt(
    kind: str, b1: float = 0.9, b2: float = 0.99, tau: float = 1e-3
) -> optax.GradientTransformation:
    """Reddi et al. Algorithm 2 (no bias correction; v starts at τ²).

    Input g = −Δ; output m / (√v + τ) with the second moment updated as
    Adagrad (v + g²), Adam (β₂v + (1−β₂)g²) or Yogi (v − (1−β₂)g² sign(v − g²)).
    """
    if kind not in ("adam", "yogi", "adagrad"):
        raise ValueError(f"unknown FedOpt kind {kind!r}; expected adam, yogi or adagrad")

    def init(params):
        return FedOptState(
            m=jax.tree.map(jnp.zeros_like, params),
            v=jax.tree.map(lambda p: jnp.full_like(p, tau**2), params),
        )

    def second_moment(v, g):
        g2 = g * g
        if kind == "adagrad":
            return v + g2
        if kind == "adam":
            return b2 * v + (1 - b2) * g2
        return v - (1 - b2) * g2 * jnp.sign(v - g2)

    def update(updates, state, params=None):
        del params
        m = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.m, updates)
        if kind == "adagrad":  # Reddi et al.'s FedAdagrad has no first-moment decay
            m = updates
        v = jax.tree.map(second_moment, state.v, updates)
        out = jax.tree.map(lambda m, v: m / (jnp.sqrt(v) + tau), m, v)
        return out, FedOptState(m=m, v=v)

    return optax.GradientTransformation(init, update)


def averaging(learning_rate: float = 1.0) -> ServerOptimizer:
    """Plain FedAvg; at learning rate 1 the server takes the weighted client mean exactly."""
    return None if learning_rate == 1.0 else optax.sgd(learning_rate)


def fedavgm(learning_rate: float = 1.0, momentum: float = 0.9) -> ServerOptimizer:
    """FedAvg with server momentum (Hsu et al. 2019): v ← βv + Δ; x ← x + ηv."""
    return optax.sgd(learning_rate, momentum=momentum)


def fedadam(learning_rate: float = 1e-2, b1=0.9, b2=0.99, tau=1e-3) -> ServerOptimizer:
    return optax.chain(scale_by_fedopt("adam", b1, b2, tau), optax.scale(-learning_rate))


def fedyogi(learning_rate: float = 1e-2, b1=0.9, b2=0.99, tau=1e-3) -> ServerOptimizer:
    return optax.chain(scale_by_fedopt("yogi", b1, b2, tau), optax.scale(-learning_rate))


def fedadagrad(learning_rate: float = 1e-2, tau=1e-3) -> ServerOptimizer:
    return optax.chain(scale_by_fedopt("adagrad", tau=tau), optax.scale(-learning_rate))


def make_server_optimizer(name: str, learning_rate: float = 1.0, **kwargs) -> ServerOptimizer:
    """Build a server optimizer by name (for configs)."""
    factories = {
        "fedavg": averaging,
        "fedavgm": fedavgm,
        "fedadam": fedadam,
        "fedyogi": fedyogi,
        "fedadagrad": fedadagrad,
    }
    if name not in factories:
        raise ValueError(f"unknown server optimizer {name!r}; choose one of {SERVER_OPTIMIZERS}")
    return factories[name](learning_rate, **kwargs)
