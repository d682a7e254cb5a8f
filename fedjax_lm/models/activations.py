"""Activation functions as NNX modules, including trainable ones (paper 3, Sütfeld et al. 2018).

Trainable activations keep their parameters as `nnx.Param`, so they live in the model's params
pytree: FedAvg averages them, optimisers update them and `jax.grad` reaches them like any weight.

* Adaptive Blending Units (ABU): f(x) = Σ_j w'_j g_j(x) over g = (tanh, ELU, ReLU, identity,
  Swish_β) with one weight vector w and one β per layer (shared by all units), w_j = 1/5, β = 1
  at init. The variant decides how w is turned into the effective weights w' (`normalize_blend`).
  The weight vector is stored under the key ``f"{variant}_w"`` so that `blend_weights` can recover
  the variant from a plain params pytree (no side channel needed for plotting).
* Adaptive scaling: α·g(x) with a per-layer α (init 1), named ``scaled_<g>``.
* Fixed activations, including the two GELU flavours our encoders need.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# Guards the normalising divisions; far below any sum reached at init (1.0), so values there
# are unchanged.
_EPS = 1e-6

ABU_VARIANTS: tuple[str, ...] = ("abu", "abu_n", "abu_a", "abu_s", "abu_p")
# Order of the blended base functions (index j of the weight vector).
ABU_BASES: tuple[str, ...] = ("tanh", "elu", "relu", "identity", "swish")


def _swish(x: jax.Array, beta: jax.Array | float = 1.0) -> jax.Array:
    return x * jax.nn.sigmoid(beta * x)


_FIXED: dict[str, Callable[[jax.Array], jax.Array]] = {
    "identity": lambda x: x,
    "tanh": jnp.tanh,
    "relu": jax.nn.relu,
    "elu": jax.nn.elu,
    "selu": jax.nn.selu,
    "swish": _swish,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}
_SCALABLE: tuple[str, ...] = ("identity", "tanh", "relu", "elu", "selu", "swish")

ACTIVATIONS: tuple[str, ...] = (
    *_FIXED,
    *(f"scaled_{name}" for name in _SCALABLE),
    *ABU_VARIANTS,
)


def normalize_blend(w: jax.Array, variant: str) -> jax.Array:
    """Effective blend weights w' for an ABU variant, normalising over the last axis.

    Works on stacked weights ([..., 5]) too, e.g. per-client params.
    """
    if variant == "abu":
        return w
    if variant == "abu_n":
        s = jnp.sum(w, axis=-1, keepdims=True)
        # Σw may be negative; keep its sign and only push it away from zero.
        s = jnp.where(jnp.abs(s) < _EPS, jnp.where(s < 0, -_EPS, _EPS), s)
        return w / s
    if variant == "abu_a":
        return w / jnp.maximum(jnp.sum(jnp.abs(w), axis=-1, keepdims=True), _EPS)
    if variant == "abu_s":
        return jax.nn.softmax(w, axis=-1)
    if variant == "abu_p":
        p = jnp.maximum(w, 0.0)
        return p / jnp.maximum(jnp.sum(p, axis=-1, keepdims=True), _EPS)
    raise ValueError(f"unknown ABU variant {variant!r}; valid: {', '.join(ABU_VARIANTS)}")


class Fixed(nnx.Module):
    """A parameter-free activation; a module only so all activations share one interface."""

    def __init__(self, name: str):
        self.name = name

    def __call__(self, x: jax.Array) -> jax.Array:
        return _FIXED[self.name](x)


class Scaled(nnx.Module):
    """Adaptive scaling α·g(x) with one trainable α per layer (init 1)."""

    def __init__(self, name: str):
        self.name = name
        self.alpha = nnx.Param(jnp.ones((), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.alpha[...] * _FIXED[self.name](x)


class ABU(nnx.Module):
    """Adaptive Blending Unit: per-layer trainable blend of tanh, ELU, ReLU, identity, Swish_β."""

    def __init__(self, variant: str):
        if variant not in ABU_VARIANTS:
            raise ValueError(f"unknown ABU variant {variant!r}; valid: {', '.join(ABU_VARIANTS)}")
        self.variant = variant
        # Key name encodes the variant, see module docstring.
        setattr(self, f"{variant}_w", nnx.Param(jnp.full((len(ABU_BASES),), 0.2, jnp.float32)))
        self.beta = nnx.Param(jnp.ones((), jnp.float32))

    @property
    def raw_weights(self) -> nnx.Param:
        return getattr(self, f"{self.variant}_w")

    def __call__(self, x: jax.Array) -> jax.Array:
        w = normalize_blend(self.raw_weights[...], self.variant)
        bases = (
            jnp.tanh(x),
            jax.nn.elu(x),
            jax.nn.relu(x),
            x,
            _swish(x, self.beta[...]),
        )
        return sum(w[j] * g for j, g in enumerate(bases))


def make_activation(name: str, *, rngs: nnx.Rngs | None = None) -> nnx.Module:
    """Build the activation `name` (see `ACTIVATIONS`) as an NNX module callable as `act(x)`.

    `rngs` is accepted for a uniform module-construction signature; all initial values are
    deterministic (w = 1/5, β = 1, α = 1).
    """
    del rngs
    if name in _FIXED:
        return Fixed(name)
    if name.startswith("scaled_") and name.removeprefix("scaled_") in _SCALABLE:
        return Scaled(name.removeprefix("scaled_"))
    if name in ABU_VARIANTS:
        return ABU(name)
    raise ValueError(f"unknown activation {name!r}; valid: {', '.join(ACTIVATIONS)}")


def blend_weights(params: Mapping[Any, Any]) -> dict[str, np.ndarray]:
    """Effective (normalised) blend weights of every ABU layer in a params pytree, for plotting.

    Keys are '/'-joined paths to the ABU module (e.g. 'act1'); values have shape [..., 5] in
    `ABU_BASES` order (leading axes kept, e.g. a client axis of stacked params).
    """
    out: dict[str, np.ndarray] = {}

    def walk(node: Mapping[Any, Any], path: tuple[str, ...]) -> None:
        for key, value in node.items():
            if isinstance(value, Mapping):
                walk(value, (*path, str(key)))
                continue
            for variant in ABU_VARIANTS:
                if key == f"{variant}_w":
                    w = normalize_blend(jnp.asarray(_unwrap(value)), variant)
                    out["/".join(path)] = np.asarray(w)

    walk(params, ())
    return out


def _unwrap(value: Any) -> Any:
    """Unwrap an `nnx.Variable` (as found in an `nnx.State`); plain arrays pass through."""
    return value[...] if isinstance(value, nnx.Variable) else value
