"""LoRA (Hu et al. 2021) on the encoders' projections, computed unmerged.

    y = x W + b + (alpha / r) · dropout(x) A B,   A [d_in, r], B [r, d_out]

The adapter path is `(x A) B`: never a `W + A B` per client, so a client's extra memory is
its activations times r, not a d_in × d_out matrix. A is Kaiming-uniform (a = √5, as
Hugging Face peft: U(±1/√d_in)), B is zero, so a fresh adapter leaves the model unchanged.

One target naming for BERT, DistilBERT and ALBERT (`LORA_TARGETS`):

    query, key, value      the attention's input projections
    attention_output       the attention's output projection
    intermediate           the FFN's first projection (hidden → intermediate)
    output                 the FFN's second projection (intermediate → hidden)

ALBERT applies one stored layer at every depth, so its adapters are shared like its weights.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from fedjax_lm.models.config import LORA_TARGET_NAMES, EncoderConfig
from fedjax_lm.models.layers import dense, dense_kwargs, dropout

# Our target name → the sub-module path inside an `EncoderLayer`.
LORA_TARGETS: dict[str, tuple[str, ...]] = {
    "query": ("attention", "query"),
    "key": ("attention", "key"),
    "value": ("attention", "value"),
    "attention_output": ("attention", "output"),
    "intermediate": ("ffn_in",),
    "output": ("ffn_out",),
}
LORA_A, LORA_B = "lora_a", "lora_b"
# Derives the adapters' dropout keys from a layer's key without touching its other keys.
_LORA_KEY_SALT = 0x10A


class LoraLinear(nnx.Linear):
    """`nnx.Linear` (same `kernel` / `bias` names, so checkpoints load unchanged) plus the
    low-rank `lora_a` / `lora_b` path."""

    def __init__(self, cfg: EncoderConfig, d_in: int, d_out: int, *, rngs: nnx.Rngs):
        super().__init__(d_in, d_out, **dense_kwargs(cfg), rngs=rngs)
        pdt = jnp.dtype(cfg.param_dtype)
        a_init = jax.nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
        self.lora_a = nnx.Param(a_init(rngs.params(), (d_in, cfg.lora_rank), pdt))
        self.lora_b = nnx.Param(jnp.zeros((cfg.lora_rank, d_out), pdt))
        self.lora_scale = cfg.lora_alpha / cfg.lora_rank
        self.lora_dropout = cfg.lora_dropout

    def __call__(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
        y = super().__call__(x)
        a = self.lora_a[...].astype(y.dtype)
        b = self.lora_b[...].astype(y.dtype)
        low = (dropout(x, self.lora_dropout, key).astype(y.dtype) @ a) @ b
        return y + (self.lora_scale * low).astype(y.dtype)


def projection(cfg: EncoderConfig, d_in: int, d_out: int, target: str, *,
               rngs: nnx.Rngs) -> nnx.Linear:
    """A target projection: with LoRA when `cfg` targets it, else the plain dense layer
    (exactly today's parameters and numbers)."""
    if cfg.lora_rank and target in cfg.lora_targets:
        return LoraLinear(cfg, d_in, d_out, rngs=rngs)
    return dense(cfg, d_in, d_out, rngs=rngs)


def lora_key(layer_key: jax.Array | None, target: str) -> jax.Array | None:
    """The dropout key of one adapter inside a layer (None in evaluation)."""
    if layer_key is None:
        return None
    salted = jax.random.fold_in(layer_key, _LORA_KEY_SALT)
    return jax.random.fold_in(salted, LORA_TARGET_NAMES.index(target))


def call(proj: nnx.Linear, x: jax.Array, layer_key: jax.Array | None, target: str) -> jax.Array:
    """Apply a projection, giving a LoRA one its dropout key."""
    if isinstance(proj, LoraLinear):
        return proj(x, lora_key(layer_key, target) if proj.lora_dropout else None)
    return proj(x)
