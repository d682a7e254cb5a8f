"""Which of an encoder's parameters train (PEFT modes) and per-client LoRA ranks, in the
terms the engine takes: a predicate over param paths (→ `federated.trainable`'s bool mask) and
a per-client 0/1 mask.

Modes (the classification head trains in every one):

    none     everything trains (no mask at all: the engine's plain path, bit for bit)
    lora     the LoRA adapters (`lora_b` only with `freeze_lora_a`: FFA-LoRA)
    head     only the head
    bitfit   every bias (Zaken et al. 2022) and the head

`freeze_layers = N` also freezes the embeddings and the stored layers 0..N-1 (for ALBERT, whose
one stored layer is applied at every depth, N counts stored layers).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lm.models.lora import LORA_A, LORA_B

PEFT_MODES = ("none", "lora", "head", "bitfit")


def trainable_predicate(mode: str, *, freeze_layers: int = 0, freeze_lora_a: bool = False
                        ) -> Callable[[tuple[str, ...]], bool] | None:
    """Whether the leaf at a param path (key names) trains; None when everything does."""
    if mode not in PEFT_MODES:
        raise ValueError(f"unknown PEFT mode {mode!r}; choose one of {PEFT_MODES}")
    if mode == "none" and not freeze_layers:
        return None

    def trains(path: tuple[str, ...]) -> bool:
        if path[0] == "head":
            return True
        if freeze_layers and (path[0] == "embeddings"
                              or (path[0] == "layers" and int(path[1]) < freeze_layers)):
            return False
        leaf = path[-1]
        if mode == "lora":
            return leaf == LORA_B or (leaf == LORA_A and not freeze_lora_a)
        if mode == "bitfit":
            return leaf == "bias"
        return mode == "none"

    return trains


def drawn_from_seed(path: tuple[str, ...]) -> bool:
    """Whether a pretrained model's leaf at `path` is drawn from the run's seed (the head, the
    LoRA adapters) rather than loaded: the leaves that runs of different seeds do not share."""
    return path[0] == "head" or path[-1] in (LORA_A, LORA_B)


def rank_mask(ranks: np.ndarray) -> Callable[[Any, jax.Array], Any]:
    """Client `i` keeps LoRA components `< ranks[i]` of the padded rank-R adapters: columns of
    `lora_a` [d_in, R], rows of `lora_b` [R, d_out]; every other leaf is kept whole."""
    table = jnp.asarray(ranks, jnp.int32)

    def client_mask(trainable: Any, client_id: jax.Array) -> Any:
        r = table[client_id]

        def leaf(path, x):
            name = str(getattr(path[-1], "key", path[-1]))
            if name == LORA_A:
                return (jnp.arange(x.shape[-1]) < r)[None, :]
            if name == LORA_B:
                return (jnp.arange(x.shape[0]) < r)[:, None]
            return jnp.ones((), x.dtype)

        return jax.tree_util.tree_map_with_path(leaf, trainable)

    return client_mask


def merge_lora(params: Any, scale: float) -> Any:
    """The params with every adapter folded into its kernel (W + scale·A B) and removed:
    a plain model (for export and for checking the unmerged path)."""
    if isinstance(params, dict):
        if LORA_A in params:
            out = {k: v for k, v in params.items() if k not in (LORA_A, LORA_B)}
            delta = params[LORA_A] @ params[LORA_B]
            out["kernel"] = params["kernel"] + (scale * delta).astype(params["kernel"].dtype)
            return out
        return {k: merge_lora(v, scale) for k, v in params.items()}
    return params
