"""The pure interface the federated engine sees: params pytrees in, outputs / losses out.

NNX modules are stateful objects; the engine wants pure functions over pytrees so it can `jit`,
`vmap` over clients and average parameters. `Model` keeps the (static) NNX graph definition and
exchanges params as plain nested dicts of arrays (`nnx.to_pure_dict`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
from flax import nnx

from fedjax_lm.models.config import EncoderConfig
from fedjax_lm.models.encoder import EncoderForSequenceClassification, EncoderOutput
from fedjax_lm.models.head import ClassificationHead
from fedjax_lm.models.stats import masked_classification_stats

Params = dict[str, Any]
Batch = Mapping[str, jax.Array]
LossFn = Callable[[Params, Batch, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]
EvalFn = Callable[[Params, Batch], dict[str, jax.Array]]


def _pure(module: nnx.Module) -> Params:
    return nnx.to_pure_dict(nnx.split(module)[1])


@dataclasses.dataclass(frozen=True)
class Model:
    """An encoder for sequence classification as pure `init` / `apply` functions."""

    config: EncoderConfig
    graphdef: Any = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        abstract = nnx.eval_shape(
            lambda: EncoderForSequenceClassification(self.config, rngs=nnx.Rngs(0))
        )
        object.__setattr__(self, "graphdef", nnx.split(abstract)[0])

    def init(self, rng: jax.Array) -> Params:
        """Random parameters (HF initialisation); jittable and vmappable over `rng`."""
        return _pure(EncoderForSequenceClassification(self.config, rngs=nnx.Rngs(params=rng)))

    def init_head(self, params: Params, rng: jax.Array) -> Params:
        """`params` with a freshly initialised classification head (server or per-client init)."""
        head = _pure(ClassificationHead(self.config, rngs=nnx.Rngs(params=rng)))
        return {**params, "head": head}

    def apply(
        self, params: Params, batch: Batch, *, train: bool, rng: jax.Array | None = None
    ) -> EncoderOutput:
        """Run on `batch` (`input_ids`, optional `attention_mask`, `token_type_ids`).

        With `train=True` dropout is on and its keys are derived from `rng` (required).
        """
        if train and rng is None:
            raise ValueError("apply(train=True) needs an rng for dropout")
        module = nnx.merge(self.graphdef, params)
        return module(
            batch["input_ids"],
            batch.get("attention_mask"),
            batch.get("token_type_ids"),
            dropout_key=rng if train else None,
        )


def build_model(config: EncoderConfig) -> Model:
    return Model(config)


def classification_loss(model: Model) -> LossFn:
    """`loss_fn(params, batch, rng) -> (masked mean cross-entropy, aux)` in training mode."""

    def loss_fn(
        params: Params, batch: Batch, rng: jax.Array
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        out = model.apply(params, batch, train=True, rng=rng)
        return masked_classification_stats(out.logits, batch)

    return loss_fn


def classification_eval(model: Model) -> EvalFn:
    """`eval_fn(params, batch) -> aux` (`loss_sum`, `correct`, `count`), no dropout."""

    def eval_fn(params: Params, batch: Batch) -> dict[str, jax.Array]:
        out = model.apply(params, batch, train=False)
        return masked_classification_stats(out.logits, batch)[1]

    return eval_fn
