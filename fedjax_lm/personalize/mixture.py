"""The mixture of experts of paper 2 (Listo Zec et al.): a per-client gate blends a local expert
with the frozen global (FedAvg) model.

    log p(y|x) = g(x)·log_softmax(local(x)) + (1 − g(x))·log_softmax(global(x)),   g = σ(gate(x))

Everything is a pure function of pytrees. A client's *personal* params are
`{"expert": ..., "gate": ...}`; the global model's params are a separate argument that is wrapped
in `stop_gradient` and never part of the optimised pytree, so the optimiser cannot move it and
nothing personal can leak into what FedAvg aggregates.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from fedjax_lm.models.stats import masked_classification_stats

Params = Any
Batch = Mapping[str, jax.Array]
# logits(params, batch, train, rng) -> [B, K]
LogitsFn = Callable[[Params, Batch, bool, jax.Array | None], jax.Array]
PersonalLoss = Callable[[Params, Batch, jax.Array, Params], tuple[jax.Array, dict[str, jax.Array]]]
PersonalEval = Callable[[Params, Batch, Params], dict[str, jax.Array]]


@dataclass(frozen=True)
class Classifier:
    """A model as two pure functions, so CNNs and encoders plug into the same algorithms."""

    init: Callable[[jax.Array], Params]
    logits: LogitsFn


def mix_log_probs(gate: jax.Array, local_logp: jax.Array, global_logp: jax.Array) -> jax.Array:
    """g·local + (1−g)·global for log-probabilities [B, K] and gate values g [B] in [0, 1].

    Kept separate from the sigmoid so that g = 1 / g = 0 give exactly the local / global
    log-probabilities (1·a + 0·b == a in floating point).
    """
    g = gate[:, None]
    return g * local_logp + (1.0 - g) * global_logp


def mixture_log_probs(
    expert: Classifier,
    gate: Classifier,
    personal: Params,
    global_params: Params,
    batch: Batch,
    *,
    train: bool,
    rng: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """(mixture log p [B, K], gate values [B]) for one client. The gate shares the expert's
    architecture with one output unit; its input is the example itself."""
    k_expert, k_gate = (None, None) if rng is None else tuple(jax.random.split(rng))
    frozen = jax.lax.stop_gradient(global_params)
    global_logp = jax.nn.log_softmax(expert.logits(frozen, batch, False, None).astype(jnp.float32))
    local_logp = jax.nn.log_softmax(
        expert.logits(personal["expert"], batch, train, k_expert).astype(jnp.float32)
    )
    gate_logit = gate.logits(personal["gate"], batch, train, k_gate)[:, 0]
    g = jax.nn.sigmoid(gate_logit.astype(jnp.float32))
    return mix_log_probs(g, local_logp, global_logp), g


def mixture_loss(expert: Classifier, gate: Classifier) -> PersonalLoss:
    """`loss(personal, batch, rng, global_params)`: NLL of the mixture; only `personal` is
    differentiated (the global model is a frozen, stop-gradient argument)."""

    def loss_fn(personal, batch, rng, global_params):
        logp, g = mixture_log_probs(
            expert, gate, personal, global_params, batch, train=True, rng=rng
        )
        loss, aux = masked_classification_stats(logp, batch, log_probs=True)
        mask = batch["mask"].astype(jnp.float32)
        aux["gate_sum"] = jnp.sum(mask * g)
        return loss, aux

    return loss_fn


def mixture_eval(expert: Classifier, gate: Classifier) -> PersonalEval:
    """`eval(personal, batch, global_params) -> sums` in inference mode (plus the gate's sum
    and sum of squares)."""

    def eval_fn(personal, batch, global_params):
        logp, g = mixture_log_probs(expert, gate, personal, global_params, batch, train=False)
        aux = masked_classification_stats(logp, batch, log_probs=True)[1]
        mask = batch["mask"].astype(jnp.float32)
        aux["gate_sum"] = jnp.sum(mask * g)
        # With gate_sum, the within-client variance of g over the examples: a gate that ignores
        # its input (one constant per client) has variance 0.
        aux["gate_sq_sum"] = jnp.sum(mask * g * g)
        return aux

    return eval_fn


def single_loss(model: Classifier) -> PersonalLoss:
    """A plain classifier in the personal-loss signature (the unused 4th argument keeps local
    training, fine-tuning and the mixture on one vectorised trainer)."""

    def loss_fn(params, batch, rng, _frozen):
        logp = jax.nn.log_softmax(model.logits(params, batch, True, rng).astype(jnp.float32))
        return masked_classification_stats(logp, batch, log_probs=True)

    return loss_fn


def single_eval(model: Classifier) -> PersonalEval:
    def eval_fn(params, batch, _frozen):
        logp = jax.nn.log_softmax(model.logits(params, batch, False, None).astype(jnp.float32))
        return masked_classification_stats(logp, batch, log_probs=True)[1]

    return eval_fn


def engine_loss(model: Classifier) -> Callable[[Params, Batch, jax.Array], tuple[jax.Array, dict]]:
    """The engine's `loss_fn(params, batch, rng)` for the global model (FedAvg)."""
    loss = single_loss(model)
    return lambda params, batch, rng: loss(params, batch, rng, None)
