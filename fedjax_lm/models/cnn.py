"""Small CIFAR CNNs (papers 2 and 3) as NNX modules, exposed through the pure model interface.

The federated engine only sees plain params pytrees and pure functions, so `make_cnn_model`
wraps a module class into `init(rng) -> params` / `apply(params, batch, *, train, rng)`, and
`image_classification_loss` turns that into the engine's `loss_fn(params, batch, rng)`.
Dropout draws its masks from the explicit `rng` argument, so everything jits and vmaps over a
leading client axis of params, batches and keys.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from fedjax_lm.models.activations import make_activation
from fedjax_lm.models.conv import CONV_IMPLS, ConvValid, conv2d_same, conv2d_valid
from fedjax_lm.models.layers import dropout
from fedjax_lm.models.pool import max_pool
from fedjax_lm.models.stats import masked_classification_stats

Params = Any  # nested dict of jax arrays
Batch = dict[str, jax.Array]




INITS: tuple[str, ...] = ("flax", "paper")


def paper_kernel_init(shape_fan: str) -> Callable:
    """Paper 3's TF initialisers: truncated normal (cut at ±2σ, not rescaled, as
    `tf.truncated_normal_initializer`) with σ = sqrt(2 / fan), where fan is kh·kw·in for a
    conv kernel and in·out for a dense kernel (the authors' code, not He: their dense σ is
    tiny by design of that formula)."""

    def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
        fan = math.prod(shape[:-1]) if shape_fan == "conv" else math.prod(shape)
        std = math.sqrt(2.0 / fan)
        return std * jax.random.truncated_normal(key, -2.0, 2.0, shape, dtype)

    return init


def _layer_inits(init: str, kind: str, bias: float) -> dict[str, Any]:
    """Keyword arguments for nnx.Conv / nnx.Linear: flax defaults, or the paper's kernels
    with constant biases (0.0 for the first conv, 0.1 elsewhere in the authors' smcn)."""
    if init == "flax":
        return {}
    if init != "paper":
        raise ValueError(f"unknown init {init!r}; valid: {', '.join(INITS)}")
    return {"kernel_init": paper_kernel_init(kind),
            "bias_init": nnx.initializers.constant(bias)}


class LeNetCifar(nnx.Module):
    """Paper 2's CIFAR CNN (the PyTorch-tutorial LeNet): 'VALID' convs, 2x2 max pools.

    32→conv5→28→pool→14→conv5→10→pool→5, so fc1 sees 5·5·16 = 400 features. `conv_impl`
    picks the lowering only (`fedjax_lm.models.conv`); nnx.Conv holds the parameters.
    """

    def __init__(self, num_classes: int, activation: str = "relu", *,
                 conv_impl: str = "patches", rngs: nnx.Rngs):
        if conv_impl not in CONV_IMPLS:
            raise ValueError(f"unknown conv impl {conv_impl!r}; valid: {', '.join(CONV_IMPLS)}")
        self.conv_impl = conv_impl
        self.conv1 = nnx.Conv(3, 6, (5, 5), padding="VALID", rngs=rngs)
        self.act1 = make_activation(activation, rngs=rngs)
        self.conv2 = nnx.Conv(6, 16, (5, 5), padding="VALID", rngs=rngs)
        self.act2 = make_activation(activation, rngs=rngs)
        self.fc1 = nnx.Linear(5 * 5 * 16, 120, rngs=rngs)
        self.act3 = make_activation(activation, rngs=rngs)
        self.fc2 = nnx.Linear(120, 84, rngs=rngs)
        self.act4 = make_activation(activation, rngs=rngs)
        self.fc3 = nnx.Linear(84, num_classes, rngs=rngs)

    def __call__(
        self, x: jax.Array, *, train: bool = False, rng: jax.Array | None = None
    ) -> jax.Array:
        del train, rng  # no dropout in this network
        conv = lambda layer, h: conv2d_valid(h, layer.kernel[...], layer.bias[...],
                                             self.conv_impl)
        x = max_pool(self.act1(conv(self.conv1, x)), 2, 2, "VALID")
        x = max_pool(self.act2(conv(self.conv2, x)), 2, 2, "VALID")
        x = x.reshape(x.shape[0], -1)
        x = self.act3(self.fc1(x))
        x = self.act4(self.fc2(x))
        return self.fc3(x)


class SMCN(nnx.Module):
    """Paper 3's "smcn": 4 'SAME' convs, two 3/2 max pools, 3 dropouts, fc384 → fc192 → fc(C).

    Each layer has its own activation module, so ABU blend weights are per layer. `width`
    (conv channels; the fcs are 6·width and 3·width) is the paper's 64 by default; a narrower
    copy lets a CPU afford the activation study. `init="paper"` uses the authors' TF
    initialisers (`paper_kernel_init`, biases 0 / 0.1); "flax" the library defaults.
    """

    def __init__(
        self,
        num_classes: int,
        activation: str = "relu",
        *,
        dropout_rate: float = 0.5,
        width: int = 64,
        init: str = "flax",
        conv_impl: str = "patches",
        rngs: nnx.Rngs,
    ):
        w = width
        self.dropout_rate = dropout_rate
        if conv_impl not in CONV_IMPLS:
            raise ValueError(f"unknown conv impl {conv_impl!r}; valid: {', '.join(CONV_IMPLS)}")
        self.conv_impl = conv_impl  # the lowering only: nnx.Conv holds the parameters
        conv = lambda bias: _layer_inits(init, "conv", bias)
        dense = _layer_inits(init, "dense", 0.1)
        self.conv1 = nnx.Conv(3, w, (5, 5), padding="SAME", rngs=rngs, **conv(0.0))
        self.act1 = make_activation(activation, rngs=rngs)
        self.conv2 = nnx.Conv(w, w, (3, 3), padding="SAME", rngs=rngs, **conv(0.1))
        self.act2 = make_activation(activation, rngs=rngs)
        self.conv3 = nnx.Conv(w, w, (1, 1), padding="SAME", rngs=rngs, **conv(0.1))
        self.act3 = make_activation(activation, rngs=rngs)
        self.conv4 = nnx.Conv(w, w, (5, 5), padding="SAME", rngs=rngs, **conv(0.1))
        self.act4 = make_activation(activation, rngs=rngs)
        # 32 → pool → 16 → pool → 8.
        self.fc1 = nnx.Linear(8 * 8 * w, 6 * w, rngs=rngs, **dense)
        self.act5 = make_activation(activation, rngs=rngs)
        self.fc2 = nnx.Linear(6 * w, 3 * w, rngs=rngs, **dense)
        self.act6 = make_activation(activation, rngs=rngs)
        self.fc3 = nnx.Linear(3 * w, num_classes, rngs=rngs, **dense)

    def __call__(
        self, x: jax.Array, *, train: bool = False, rng: jax.Array | None = None
    ) -> jax.Array:
        if train and rng is None and self.dropout_rate:
            raise ValueError("dropout in training needs an rng")
        keys = jax.random.split(rng, 3) if train and rng is not None else (None, None, None)
        drop = lambda h, i: dropout(h, self.dropout_rate, keys[i])
        conv = lambda layer, h: conv2d_same(h, layer.kernel[...], layer.bias[...],
                                            self.conv_impl)
        x = drop(self.act1(conv(self.conv1, x)), 0)
        x = max_pool(self.act2(conv(self.conv2, x)), 3, 2, "SAME")
        x = drop(self.act3(conv(self.conv3, x)), 1)
        x = max_pool(self.act4(conv(self.conv4, x)), 3, 2, "SAME")
        x = x.reshape(x.shape[0], -1)
        x = drop(self.act5(self.fc1(x)), 2)
        x = self.act6(self.fc2(x))
        return self.fc3(x)


class PflSimpleCnn(nnx.Module):
    """pfl-research's benchmark CNN (`simple_cnn` of its framework comparison, NeurIPS 2024):
    conv3x3·32 → ReLU → conv3x3·64 → ReLU → 2x2 max pool → dropout 0.25 → fc128 → ReLU →
    dropout 0.5 → fc(C); Glorot-uniform weights. 32→30→28→pool→14, so fc1 sees 14·14·64.
    `conv_impl` picks the convolutions' lowering (`models/conv.py`), not the function:
    patches × matrix by default: 6.8x faster than XLA:CPU's convolution with clients vmapped,
    1.2x one client at a time (`benchmarks/results/conv-in-loops/conv_clients.md`)."""

    def __init__(self, num_classes: int, *, conv_impl: str = "patches", rngs: nnx.Rngs):
        self.conv1 = ConvValid(3, 32, 3, impl=conv_impl, rngs=rngs)
        self.conv2 = ConvValid(32, 64, 3, impl=conv_impl, rngs=rngs)
        glorot = nnx.initializers.glorot_uniform()
        self.fc1 = nnx.Linear(14 * 14 * 64, 128, kernel_init=glorot, rngs=rngs)
        self.fc2 = nnx.Linear(128, num_classes, kernel_init=glorot, rngs=rngs)

    def __call__(
        self, x: jax.Array, *, train: bool = False, rng: jax.Array | None = None
    ) -> jax.Array:
        if train and rng is None:
            raise ValueError("dropout in training needs an rng")
        k1, k2 = jax.random.split(rng) if train else (None, None)
        x = jax.nn.relu(self.conv2(jax.nn.relu(self.conv1(x))))
        x = dropout(max_pool(x, 2, 2, "VALID"), 0.25, k1)
        x = dropout(jax.nn.relu(self.fc1(x.reshape(x.shape[0], -1))), 0.5, k2)
        return self.fc2(x)


CNN_MODELS: dict[str, type[nnx.Module]] = {"lenet": LeNetCifar, "smcn": SMCN,
                                           "pfl_cnn": PflSimpleCnn}


@dataclass(frozen=True)
class CnnModel:
    """Pure wrapper of an NNX CNN: params are a plain nested dict of arrays."""

    module_fn: Callable[[nnx.Rngs], nnx.Module]
    graphdef: Any
    abstract_state: Any

    def init(self, rng: jax.Array) -> Params:
        """Fresh params from `rng` (jittable)."""
        _, state = nnx.split(self.module_fn(nnx.Rngs(params=rng)))
        return nnx.to_pure_dict(state)

    def apply(
        self, params: Params, batch: Batch, *, train: bool, rng: jax.Array | None = None
    ) -> jax.Array:
        """Logits [B, num_classes] for `batch["image"]` ([B, 32, 32, 3] float32)."""
        # Copy the abstract state: replace_by_pure_dict fills it in place.
        state = jax.tree.map(lambda v: v, self.abstract_state)
        nnx.replace_by_pure_dict(state, params)
        module = nnx.merge(self.graphdef, state)
        return module(batch["image"], train=train, rng=rng)


def make_cnn_model(
    name: str, num_classes: int, activation: str = "relu", *, dropout_rate: float = 0.5,
    width: int = 64, init: str = "flax", conv_impl: str = "patches",
) -> CnnModel:
    """Build the pure model for `name` in {"lenet", "smcn", "pfl_cnn"}; `dropout_rate`, `width`
    and `init` apply to smcn, `conv_impl` (the convs' lowering) to all three."""
    if name not in CNN_MODELS:
        raise ValueError(f"unknown CNN {name!r}; valid: {', '.join(CNN_MODELS)}")
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; valid: {', '.join(INITS)}")
    if name == "pfl_cnn":
        module_fn = lambda rngs: PflSimpleCnn(num_classes, conv_impl=conv_impl, rngs=rngs)
    elif name == "smcn":
        module_fn = lambda rngs: SMCN(num_classes, activation, dropout_rate=dropout_rate,
                                      width=width, init=init, conv_impl=conv_impl, rngs=rngs)
    else:
        module_fn = lambda rngs: LeNetCifar(num_classes, activation, conv_impl=conv_impl,
                                            rngs=rngs)
    graphdef, abstract_state = nnx.split(nnx.eval_shape(lambda: module_fn(nnx.Rngs(0))))
    return CnnModel(module_fn, graphdef, abstract_state)


def image_classification_loss(
    model: CnnModel,
) -> Callable[[Params, Batch, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]:
    """The engine's `loss_fn(params, batch, rng) -> (loss, aux)` in training mode."""

    def loss_fn(params: Params, batch: Batch, rng: jax.Array):
        return masked_classification_stats(model.apply(params, batch, train=True, rng=rng), batch)

    return loss_fn


def image_classification_eval(
    model: CnnModel,
) -> Callable[[Params, Batch], dict[str, jax.Array]]:
    """`eval_fn(params, batch) -> aux` (sums over real examples) in inference mode."""

    def eval_fn(params: Params, batch: Batch):
        return masked_classification_stats(model.apply(params, batch, train=False), batch)[1]

    return eval_fn
