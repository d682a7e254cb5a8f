"""Sequence-classification heads, kept apart from the pretrained body on purpose.

Everything under the `head` params key is what a checkpoint does not provide (BERT/ALBERT: the
classifier; DistilBERT: pre_classifier + classifier), so it can be re-initialised per client
(paper 1's code built a fresh random head on every client) without touching pretrained weights.
The BERT/ALBERT pooler is pretrained and therefore lives in the body.
"""

from __future__ import annotations

import jax
from flax import nnx

from fedjax_lm.models.config import EncoderConfig
from fedjax_lm.models.layers import dense, dropout


class ClassificationHead(nnx.Module):
    """pooled [B, H] → (DistilBERT: ReLU(pre_classifier)) → dropout → classifier [B, num_labels]."""

    def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs):
        h = cfg.hidden_size
        self.pre_classifier = (
            dense(cfg, h, h, rngs=rngs) if cfg.model_type == "distilbert" else None
        )
        self.classifier = dense(cfg, h, cfg.num_labels, rngs=rngs)
        self.rate = cfg.classifier_dropout_prob

    def __call__(self, pooled: jax.Array, key: jax.Array | None) -> jax.Array:
        if self.pre_classifier is not None:
            pooled = jax.nn.relu(self.pre_classifier(pooled))
        return self.classifier(dropout(pooled, self.rate, key))
