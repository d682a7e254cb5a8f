"""Embeddings and the post-LN Transformer layer shared by BERT, DistilBERT and ALBERT.

The architectures differ only in switches read from the config: token-type embeddings (not in
DistilBERT), a factorised embedding projection (ALBERT: embedding_size → hidden), and where
hidden dropout is applied (DistilBERT has none after the attention projection, ALBERT none after
the FFN), mirroring Hugging Face so training-time behaviour matches too.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from fedjax_lm.models import lora
from fedjax_lm.models.attention import SelfAttention
from fedjax_lm.models.config import EncoderConfig
from fedjax_lm.models.hidden_act import make_hidden_act
from fedjax_lm.models.layers import dense, dropout, embed, layer_norm, split_key


class Embeddings(nnx.Module):
    """word + absolute position (+ token type) → LayerNorm → dropout (→ ALBERT projection)."""

    def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs):
        dim = cfg.embedding_size or cfg.hidden_size
        self.word = embed(cfg, cfg.vocab_size, dim, rngs=rngs)
        self.position = embed(cfg, cfg.max_position_embeddings, dim, rngs=rngs)
        self.token_type = (
            embed(cfg, cfg.type_vocab_size, dim, rngs=rngs) if cfg.type_vocab_size else None
        )
        self.norm = layer_norm(cfg, dim, rngs=rngs)
        self.projection = (
            dense(cfg, dim, cfg.hidden_size, rngs=rngs) if cfg.model_type == "albert" else None
        )
        self.rate = cfg.hidden_dropout_prob
        self.dtype = jnp.dtype(cfg.dtype)
        self.pad_token_id = cfg.pad_token_id

    def __call__(
        self, input_ids: jax.Array, token_type_ids: jax.Array | None, key: jax.Array | None
    ) -> jax.Array:
        length = input_ids.shape[-1]
        if length > self.position.num_embeddings:
            raise ValueError(
                f"sequence length {length} exceeds max_position_embeddings "
                f"{self.position.num_embeddings}"
            )
        x = self.word(input_ids)
        if self.pad_token_id is not None:
            # HF's padding_idx: the pad row gets no gradient, even where padding is attended.
            # Same values; only the pad positions' cotangents are cut (a [B, L, E] select).
            is_pad = (input_ids == self.pad_token_id)[..., None]
            x = jnp.where(is_pad, jax.lax.stop_gradient(x), x)
        x = x + self.position(jnp.arange(length))[None]
        if self.token_type is not None:
            if token_type_ids is None:
                token_type_ids = jnp.zeros_like(input_ids)
            x = x + _small_lookup(self.token_type, token_type_ids)
        x = dropout(self.norm(x.astype(self.dtype)), self.rate, key)
        return x if self.projection is None else self.projection(x)


def _small_lookup(table: nnx.Embed, ids: jax.Array) -> jax.Array:
    """Embedding lookup as an exact one-hot matmul, for tables of a few rows (token types).

    A gather's gradient is a scatter-add whose B·L updates all land on those few rows: heavy
    atomic contention on GPUs. The one-hot product's gradient is a plain matmul.
    """
    weights = table.embedding[...]
    one_hot = jax.nn.one_hot(ids, weights.shape[0], dtype=weights.dtype)
    return jnp.einsum("blt,th->blh", one_hot, weights, precision=jax.lax.Precision.HIGHEST)


class EncoderLayer(nnx.Module):
    """x → LN(x + drop(attn(x))) → LN(h + drop(ffn_out(act(ffn_in(h)))))."""

    def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs):
        self.attention = SelfAttention(cfg, rngs=rngs)
        self.attention_norm = layer_norm(cfg, cfg.hidden_size, rngs=rngs)
        self.ffn_in = lora.projection(cfg, cfg.hidden_size, cfg.intermediate_size,
                                      "intermediate", rngs=rngs)
        self.act = make_hidden_act(cfg.hidden_act, rngs=rngs)
        self.ffn_out = lora.projection(cfg, cfg.intermediate_size, cfg.hidden_size, "output",
                                       rngs=rngs)
        self.output_norm = layer_norm(cfg, cfg.hidden_size, rngs=rngs)
        self.rate = cfg.hidden_dropout_prob
        self.attn_output_dropout = cfg.model_type != "distilbert"
        self.ffn_output_dropout = cfg.model_type != "albert"

    def __call__(self, x: jax.Array, keep: jax.Array | None, key: jax.Array | None) -> jax.Array:
        k_attn, k_attn_out, k_ffn = split_key(key, 3)
        a = self.attention(x, keep, k_attn, key)
        if self.attn_output_dropout:
            a = dropout(a, self.rate, k_attn_out)
        h = self.attention_norm(x + a)
        f = lora.call(self.ffn_in, h, key, "intermediate")
        f = lora.call(self.ffn_out, self.act(f).astype(h.dtype), key, "output")
        if self.ffn_output_dropout:
            f = dropout(f, self.rate, k_ffn)
        return self.output_norm(h + f)
