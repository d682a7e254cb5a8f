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

from fedjax_lm.models.config import EncoderConfig
from fedjax_lm.models.layers import dense, dropout


def additive_mask(keep: jax.Array) -> jax.Array:
    """[B, L] keep-mask → [B, 1, 1, L] float32 bias: 0 on real keys, float32 min on padding (HF)."""
    bias = (1.0 - keep.astype(jnp.float32)) * jnp.finfo(jnp.float32).min
    return bias[:, None, None, :]


class SelfAttention(nnx.Module):
    """Query/key/value/output projections over `num_attention_heads` heads."""

    def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs):
        h = cfg.hidden_size
        self.query = dense(cfg, h, h, rngs=rngs)
        self.key = dense(cfg, h, h, rngs=rngs)
        self.value = dense(cfg, h, h, rngs=rngs)
        self.output = dense(cfg, h, h, rngs=rngs)
        self.num_heads = cfg.num_attention_heads
        self.impl = cfg.attention_impl
        self.probs_dropout = cfg.attention_probs_dropout_prob

    def __call__(
        self, x: jax.Array, keep: jax.Array | None, key: jax.Array | None
    ) -> jax.Array:
        """x [B, L, H]; keep [B, L] (1 = real token) or None to attend everywhere."""
        b, length, h = x.shape
        shape = (b, length, self.num_heads, h // self.num_heads)
        q = self.query(x).reshape(shape)
        k = self.key(x).reshape(shape)
        v = self.value(x).reshape(shape)
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
        return self.output(ctx.reshape(b, length, h))
