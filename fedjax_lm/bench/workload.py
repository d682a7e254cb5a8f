"""The benchmark workload: a random-init BERT encoder, synthetic token ids, and its FLOP count.

Weights and data are random on purpose: speed does not depend on their values, and random
inputs keep the bench offline and identical for our engine and the PyTorch peers (which build
the same architecture from `peer_config`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from fedjax_lm.models import EncoderConfig, Model, classification_loss, preset


@dataclasses.dataclass(frozen=True)
class Workload:
    """One cell's shape: model size, clients × local steps × batch × sequence length."""

    model: str = "tiny"
    clients: int = 1
    local_steps: int = 4
    batch_size: int = 8
    max_length: int = 32
    dtype: str = "float32"
    attention_impl: str = "xla"
    remat: bool = False
    peft: str = "none"  # with lora: R = lora_rank on lora_targets
    lora_rank: int = 8
    lora_targets: str = "query,value"

    @property
    def examples_per_round(self) -> int:
        return self.clients * self.local_steps * self.batch_size

    @property
    def tokens_per_round(self) -> int:
        return self.examples_per_round * self.max_length


def encoder_config(w: Workload) -> EncoderConfig:
    """The preset with the bench's compute options; bf16 computes in bf16, stores in fp32."""
    lora = ({"lora_rank": w.lora_rank, "lora_targets": tuple(w.lora_targets.split(","))}
            if w.peft == "lora" else {})
    return preset(w.model, dtype=w.dtype, attention_impl=w.attention_impl, remat=w.remat,
                  **lora)


def build(w: Workload, seed: int = 0) -> tuple[Model, Any, Any]:
    """(model, random params, loss_fn) for the workload."""
    model = Model(encoder_config(w))
    params = jax.jit(model.init)(jax.random.key(seed))
    return model, params, classification_loss(model)


def trainable_mask(w: Workload, params: Any) -> Any:
    """The workload's PEFT mask over `params` (None: every parameter trains)."""
    from fedjax_lm.federated import mask_from_predicate
    from fedjax_lm.models.peft import trainable_predicate

    pred = trainable_predicate(w.peft)
    return None if pred is None else mask_from_predicate(params, pred)


def synthetic_data(w: Workload, vocab_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Client data `[C, S, B, L]` of random token ids, all real (mask 1, no padding)."""
    rs = np.random.RandomState(seed)
    shape = (w.clients, w.local_steps, w.batch_size)
    return {
        "input_ids": rs.randint(0, vocab_size, shape + (w.max_length,)).astype(np.int32),
        "attention_mask": np.ones(shape + (w.max_length,), np.int32),
        "token_type_ids": np.zeros(shape + (w.max_length,), np.int32),
        "label": rs.randint(0, 2, shape).astype(np.int32),
        "mask": np.ones(shape, np.float32),
    }


def train_flops_per_token(cfg: EncoderConfig, length: int, frozen_body: bool = False) -> float:
    """Training FLOPs per token (forward + backward = 3 × forward), counted from the model.

    Dense layers: 6 · (non-embedding weights) per token (2 per multiply-add, ×3 for training);
    4 with a `frozen_body` (PEFT: no weight gradients; the adapters' own FLOPs, ~R/H of a
    projection's, are not counted).
    Attention: per layer, QKᵀ and probs·V each cost 2·L·H per token forward → 12·L·H trained.
    Embedding lookups, norms, softmax and the optimizer are not matmuls and are not counted,
    so this is the useful work a matmul roofline can be compared with.
    """
    h, i = cfg.hidden_size, cfg.intermediate_size
    per_layer = 4 * h * h + 2 * h * i
    dense = (4 if frozen_body else 6) * per_layer * cfg.num_hidden_layers
    attention = 12 * length * h * cfg.num_hidden_layers
    return float(dense + attention)


def peer_config(cfg: EncoderConfig) -> dict[str, Any]:
    """The Hugging Face `BertConfig` fields for the same architecture (peers build from it)."""
    return {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "intermediate_size": cfg.intermediate_size,
        "hidden_act": cfg.hidden_act,
        "hidden_dropout_prob": cfg.hidden_dropout_prob,
        "attention_probs_dropout_prob": cfg.attention_probs_dropout_prob,
        "max_position_embeddings": cfg.max_position_embeddings,
        "type_vocab_size": cfg.type_vocab_size,
        "layer_norm_eps": cfg.layer_norm_eps,
        "num_labels": cfg.num_labels,
    }
