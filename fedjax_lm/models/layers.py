"""Building blocks shared by the encoders: HF-initialised dense / embed / layer-norm, dropout.

Initialisation follows Hugging Face (`normal(initializer_range)` weights, zero biases, unit
layer-norm scale) so randomly initialised parts (the classification head) start like theirs.
Dropout is a pure function of an explicit key: no RNG state lives in the modules, so a model's
state is exactly its parameters. The CNNs use the same `dropout`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from fedjax_lm.models.config import EncoderConfig


def dense_kwargs(cfg: EncoderConfig) -> dict:
    """`nnx.Linear`'s initialisers and dtypes for `cfg` (shared with LoRA projections)."""
    return dict(
        kernel_init=nnx.initializers.normal(cfg.initializer_range),
        bias_init=nnx.initializers.zeros,
        dtype=jnp.dtype(cfg.dtype),
        param_dtype=jnp.dtype(cfg.param_dtype),
    )


def dense(cfg: EncoderConfig, d_in: int, d_out: int, *, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(d_in, d_out, **dense_kwargs(cfg), rngs=rngs)


def embed(cfg: EncoderConfig, num: int, dim: int, *, rngs: nnx.Rngs) -> nnx.Embed:
    # Looked up in the parameter dtype (the caller casts the result): a lookup in bf16 would make
    # its gradient a bf16 scatter-add, which is slow on GPUs.
    return nnx.Embed(
        num,
        dim,
        embedding_init=nnx.initializers.normal(cfg.initializer_range),
        dtype=jnp.dtype(cfg.param_dtype),
        param_dtype=jnp.dtype(cfg.param_dtype),
        rngs=rngs,
    )


def layer_norm(cfg: EncoderConfig, dim: int, *, rngs: nnx.Rngs) -> nnx.LayerNorm:
    # use_fast_variance=False: E[(x-μ)²] like PyTorch, not E[x²]-μ² (needed for 1e-4 parity).
    return nnx.LayerNorm(
        dim,
        epsilon=cfg.layer_norm_eps,
        use_fast_variance=False,
        dtype=jnp.dtype(cfg.dtype),
        param_dtype=jnp.dtype(cfg.param_dtype),
        rngs=rngs,
    )


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout; identity when `key` is None (evaluation) or `rate` is 0."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x)).astype(x.dtype)


def split_key(key: jax.Array | None, n: int) -> list[jax.Array | None]:
    """`n` independent keys, or `n` Nones when dropout is off."""
    if key is None:
        return [None] * n
    return list(jax.random.split(key, n))
