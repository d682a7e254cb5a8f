"""Client optimizers by name, for configs, the bench and the planner (one factory)."""

from __future__ import annotations

import optax

CLIENT_OPTIMIZERS = ("sgd", "momentum", "adam", "adamw")


def make_client_optimizer(
    name: str, learning_rate: float, *, momentum: float = 0.0, weight_decay: float = 0.0
) -> optax.GradientTransformation:
    """`sgd` (with `momentum` when > 0), `momentum` (SGD, β = `momentum` or 0.9), `adam`,
    `adamw` (decoupled `weight_decay`)."""
    if name == "sgd":
        return optax.sgd(learning_rate, momentum=momentum or None)
    if name == "momentum":
        return optax.sgd(learning_rate, momentum=momentum or 0.9)
    if name == "adam":
        return optax.adam(learning_rate)
    if name == "adamw":
        return optax.adamw(learning_rate, weight_decay=weight_decay)
    raise ValueError(f"unknown client optimizer {name!r}; choose one of {CLIENT_OPTIMIZERS}")
