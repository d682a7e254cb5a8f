"""The full encoder for sequence classification and its output pytree.

BERT / ALBERT pool with tanh(dense([CLS])); DistilBERT feeds [CLS] straight to its head; with
`pooling="mean"` every architecture feeds the attention-masked token mean instead. ALBERT's
cross-layer sharing is a schedule of stored-layer indices: one stored layer group applied
`num_hidden_layers` times, each application with its own dropout key.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from fedjax_lm.models.blocks import Embeddings, EncoderLayer
from fedjax_lm.models.config import EncoderConfig
from fedjax_lm.models.head import ClassificationHead
from fedjax_lm.models.layers import dense, split_key


@struct.dataclass
class EncoderOutput:
    """`logits` float32 [B, num_labels]; `last_hidden_state` [B, L, H] in the compute dtype."""

    logits: jax.Array
    last_hidden_state: jax.Array


def _apply_layer(
    layer: EncoderLayer, x: jax.Array, keep: jax.Array | None, key: jax.Array | None
) -> jax.Array:
    return layer(x, keep, key)


_remat_layer = nnx.remat(_apply_layer)


def mean_pool(x: jax.Array, attention_mask: jax.Array | None) -> jax.Array:
    """[B, L, H] → [B, H]: the mean over the tokens the mask keeps (all without a mask), summed
    in float32; sentence-transformers' formula, sum(x·m) / max(sum(m), 1e-9)."""
    if attention_mask is None:
        return jnp.mean(x.astype(jnp.float32), axis=1).astype(x.dtype)
    m = attention_mask.astype(jnp.float32)[..., None]
    total = jnp.sum(x.astype(jnp.float32) * m, axis=1)
    return (total / jnp.maximum(jnp.sum(m, axis=1), 1e-9)).astype(x.dtype)


class EncoderForSequenceClassification(nnx.Module):
    """Embeddings → layers → [CLS] or token mean → pooler (BERT/ALBERT, cls) → head."""

    def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs):
        self.embeddings = Embeddings(cfg, rngs=rngs)
        self.layers = nnx.List([EncoderLayer(cfg, rngs=rngs) for _ in range(cfg.num_stored_layers)])
        self.pooler = (
            dense(cfg, cfg.hidden_size, cfg.hidden_size, rngs=rngs) if cfg.has_pooler else None
        )
        self.mean_pool = cfg.pooling == "mean"
        self.head = ClassificationHead(cfg, rngs=rngs)
        self.schedule = tuple(cfg.layer_schedule())
        self.remat = cfg.remat
        self.attend_to_padding = cfg.attend_to_padding

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
        *,
        dropout_key: jax.Array | None = None,
    ) -> EncoderOutput:
        """`dropout_key` None = evaluation (no dropout)."""
        keys = split_key(dropout_key, len(self.schedule) + 2)
        keep = None if self.attend_to_padding else attention_mask
        x = self.embeddings(input_ids, token_type_ids, keys[0])
        apply = _remat_layer if self.remat else _apply_layer
        for i, idx in enumerate(self.schedule):
            x = apply(self.layers[idx], x, keep, keys[i + 1])
        pooled = mean_pool(x, attention_mask) if self.mean_pool else x[:, 0]
        if self.pooler is not None:
            pooled = jnp.tanh(self.pooler(pooled))
        logits = self.head(pooled, keys[-1]).astype(jnp.float32)
        return EncoderOutput(logits=logits, last_hidden_state=x)
