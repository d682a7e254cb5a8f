"""Bidirectional multi-head self-attention with a padding mask, two interchangeable kernels.

"xla" mirrors Hugging Face's eager path (scaled scores + additive large-negative on padding keys,
softmax, dropout on the probabilities) with the softmax in float32 for bf16 stability;
"dot_product" calls `jax.nn.dot_product_attention` (fused on GPU) with the same mask.
Returns the output projection before any residual/dropout: the blocks differ there.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from fedjax_lm.models import lora
from fedjax_lm.models.config import EncoderConfig
from fedjax_lm.models.layers import dropout


def additive_mask(keep: jax.Array) -> jax.Array:
    """[B, L] keep-mask → [B, 1, 1, L] float32 bias: 0 on real keys, float32 min on padding (HF)."""
    bias = (1.0 - keep.astype(jnp.float32)) * jnp.finfo(jnp.float32).min
    return bias[:, None, None, :]


class SelfAttention(nnx.Module):
    """Query/key/value/output projections over `num_attention_heads` heads."""

    def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs):
        h = cfg.hidden_size
        self.query = lora.projection(cfg, h, h, "query", rngs=rngs)
        self.key = lora.projection(cfg, h, h, "key", rngs=rngs)
        self.value = lora.projection(cfg, h, h, "value", rngs=rngs)
        self.output = lora.projection(cfg, h, h, "attention_output", rngs=rngs)
        self.num_heads = cfg.num_attention_heads
        self.impl = cfg.attention_impl
        self.probs_dropout = cfg.attention_probs_dropout_prob

    def __call__(
        self, x: jax.Array, keep: jax.Array | None, key: jax.Array | None,
        layer_key: jax.Array | None = None,
    ) -> jax.Array:
        """x [B, L, H]; keep [B, L] (1 = real token) or None to attend everywhere;
        `layer_key` seeds LoRA dropout (None: none)."""
        b, length, h = x.shape
        shape = (b, length, self.num_heads, h // self.num_heads)
        q = lora.call(self.query, x, layer_key, "query").reshape(shape)
        k = lora.call(self.key, x, layer_key, "key").reshape(shape)
        v = lora.call(self.value, x, layer_key, "value").reshape(shape)
        if self.impl == "dot_product":
            mask = None if keep is None else keep.astype(bool)[:, None, None, :]
            ctx = jax.nn.dot_product_attention(q, k, v, mask=mask)
        else:
            scale = (h // self.num_heads) ** -0.5
            scores = jnp.einsum("bqnd,bknd->bnqk", q, k).astype(jnp.float32) * scale
            if keep is not None:
                scores = scores + additive_mask(keep)
            probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
            probs = dropout(probs, self.probs_dropout, key)
            ctx = jnp.einsum("bnqk,bknd->bqnd", probs, v)
        return lora.call(self.output, ctx.reshape(b, length, h), layer_key, "attention_output")
