"""Classification statistics over a padded batch: one definition for every model and trainer.

The engine sums `loss_sum`, `correct` and `count` over steps and clients and divides once, so
padding examples (mask 0) must contribute exactly nothing and a fully padded batch must not
divide by zero.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp


def classification_stats(
    scores: jax.Array, labels: jax.Array, *, log_probs: bool = False
) -> tuple[jax.Array, jax.Array]:
    """Per-example (NLL float32 [B], correct bool [B]) for `scores` [B, K].

    `scores` are logits (normalised here in float32) or, with `log_probs=True`, scores used as
    log-probabilities as they are (e.g. a mixture's blended log-probabilities). The prediction is
    the argmax of `scores` as given.
    """
    labels = labels.astype(jnp.int32)
    logp = scores.astype(jnp.float32)
    if not log_probs:
        logp = jax.nn.log_softmax(logp, axis=-1)
    nll = -jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0]
    return nll, jnp.argmax(scores, axis=-1) == labels


def masked_classification_stats(
    scores: jax.Array, batch: Mapping[str, jax.Array], *, log_probs: bool = False
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(masked mean NLL, {"loss_sum", "correct", "count"}) over the real examples of `batch`.

    Reads `batch["label"]` and the optional `batch["mask"]` (1 = real example; absent = all
    real). `scores` and `log_probs` as in `classification_stats`.
    """
    nll, correct = classification_stats(scores, batch["label"], log_probs=log_probs)
    mask = batch.get("mask")
    mask = jnp.ones(nll.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
    count = mask.sum()
    loss_sum = (nll * mask).sum()
    aux = {
        "loss_sum": loss_sum,
        "correct": (correct * mask).sum().astype(jnp.float32),
        "count": count,
    }
    return loss_sum / jnp.maximum(count, 1.0), aux
