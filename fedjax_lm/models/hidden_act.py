"""The FFN activation named by a config's `hidden_act`, as one NNX module per layer.

Hugging Face names (`gelu` = exact erf GELU, `gelu_new` / `gelu_pytorch_tanh` = tanh
approximation, ...) are implemented here, matching `transformers.activations`, so pretrained
checkpoints reproduce. Any other name (trainable ABUs, α-scaled activations) is delegated to
`fedjax_lm.models.activations.make_activation`, imported lazily; those may carry per-layer
parameters, which is why every layer owns its own activation module.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx


def _gelu_fast(x: jax.Array) -> jax.Array:
    return 0.5 * x * (1.0 + jnp.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))


HF_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_python": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": _gelu_fast,
    "gelu_10": lambda x: jnp.clip(jax.nn.gelu(x, approximate=False), -10.0, 10.0),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu_accurate": lambda x: 0.5 * x * (
        1 + jnp.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3))
    ),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
    "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
    "linear": lambda x: x,
}


class HFActivation(nnx.Module):
    """A parameter-free Hugging Face activation; the name is static (part of the graph)."""

    def __init__(self, name: str):
        self.name = name

    def __call__(self, x: jax.Array) -> jax.Array:
        return HF_ACTIVATIONS[self.name](x)


def hidden_act_names() -> tuple[str, ...]:
    """Every valid `hidden_act`: the Hugging Face names, then the trainable / scaled ones."""
    from fedjax_lm.models.activations import ACTIVATIONS  # lazy: optional sibling module

    return (*HF_ACTIVATIONS, *(a for a in ACTIVATIONS if a not in HF_ACTIVATIONS))


def make_hidden_act(name: str, *, rngs: nnx.Rngs) -> nnx.Module:
    """Build the activation module for `hidden_act` = `name`."""
    if name in HF_ACTIVATIONS:
        return HFActivation(name)
    from fedjax_lm.models.activations import make_activation  # lazy: optional sibling module

    return make_activation(name, rngs=rngs)
