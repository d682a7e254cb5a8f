"""Where each of our parameters lives in a Hugging Face PyTorch checkpoint.

A pure naming table per architecture: our params path → HF tensor name(s) and whether the tensor
is a `torch.nn.Linear` weight (stored [out, in], so transposed into our [in, out] kernel).
Body names are relative to the architecture prefix (`bert.`, `distilbert.`, `albert.`), which
some checkpoints omit (e.g. sentence-transformers' MiniLM); head names never carry it.
"""

from __future__ import annotations

import dataclasses

from fedjax_lm.models.config import EncoderConfig

Path = tuple[str | int, ...]


@dataclasses.dataclass(frozen=True)
class Source:
    """HF tensor name candidates (first present wins), and whether to transpose."""

    names: tuple[str, ...]
    transpose: bool = False
    in_head: bool = False  # head tensors have no architecture prefix and are optional


def _linear(ours: Path, theirs: str, in_head: bool = False) -> dict[Path, Source]:
    return {
        (*ours, "kernel"): Source((f"{theirs}.weight",), transpose=True, in_head=in_head),
        (*ours, "bias"): Source((f"{theirs}.bias",), in_head=in_head),
    }


def _norm(ours: Path, theirs: str) -> dict[Path, Source]:
    # Old TF-converted checkpoints name LayerNorm parameters gamma / beta.
    return {
        (*ours, "scale"): Source((f"{theirs}.weight", f"{theirs}.gamma")),
        (*ours, "bias"): Source((f"{theirs}.bias", f"{theirs}.beta")),
    }


def _embed(ours: str, theirs: str) -> dict[Path, Source]:
    return {("embeddings", ours, "embedding"): Source((f"embeddings.{theirs}.weight",))}


def _layer_names(cfg: EncoderConfig, stored: int) -> dict[str, str]:
    """HF module names for our stored layer `stored`, keyed by our sub-module name."""
    if cfg.model_type == "bert":
        p = f"encoder.layer.{stored}"
        return {
            "query": f"{p}.attention.self.query", "key": f"{p}.attention.self.key",
            "value": f"{p}.attention.self.value", "output": f"{p}.attention.output.dense",
            "attention_norm": f"{p}.attention.output.LayerNorm",
            "ffn_in": f"{p}.intermediate.dense", "ffn_out": f"{p}.output.dense",
            "output_norm": f"{p}.output.LayerNorm",
        }
    if cfg.model_type == "distilbert":
        p = f"transformer.layer.{stored}"
        return {
            "query": f"{p}.attention.q_lin", "key": f"{p}.attention.k_lin",
            "value": f"{p}.attention.v_lin", "output": f"{p}.attention.out_lin",
            "attention_norm": f"{p}.sa_layer_norm",
            "ffn_in": f"{p}.ffn.lin1", "ffn_out": f"{p}.ffn.lin2",
            "output_norm": f"{p}.output_layer_norm",
        }
    group, inner = divmod(stored, cfg.inner_group_num)
    p = f"encoder.albert_layer_groups.{group}.albert_layers.{inner}"
    return {
        "query": f"{p}.attention.query", "key": f"{p}.attention.key",
        "value": f"{p}.attention.value", "output": f"{p}.attention.dense",
        "attention_norm": f"{p}.attention.LayerNorm",
        "ffn_in": f"{p}.ffn", "ffn_out": f"{p}.ffn_output",
        "output_norm": f"{p}.full_layer_layer_norm",
    }


def hf_sources(cfg: EncoderConfig) -> dict[Path, Source]:
    """Every checkpoint-backed leaf of our params, for `cfg`'s architecture."""
    table: dict[Path, Source] = {}
    table |= _embed("word", "word_embeddings")
    table |= _embed("position", "position_embeddings")
    if cfg.type_vocab_size:
        table |= _embed("token_type", "token_type_embeddings")
    table |= _norm(("embeddings", "norm"), "embeddings.LayerNorm")
    if cfg.model_type == "albert":
        table |= _linear(("embeddings", "projection"), "encoder.embedding_hidden_mapping_in")
    for i in range(cfg.num_stored_layers):
        names = _layer_names(cfg, i)
        for sub in ("query", "key", "value", "output"):
            table |= _linear(("layers", i, "attention", sub), names[sub])
        for sub in ("ffn_in", "ffn_out"):
            table |= _linear(("layers", i, sub), names[sub])
        for sub in ("attention_norm", "output_norm"):
            table |= _norm(("layers", i, sub), names[sub])
    if cfg.has_pooler:
        table |= _linear(("pooler",), "pooler.dense" if cfg.model_type == "bert" else "pooler")
    if cfg.model_type == "distilbert":
        table |= _linear(("head", "pre_classifier"), "pre_classifier", in_head=True)
    table |= _linear(("head", "classifier"), "classifier", in_head=True)
    return table


ARCH_PREFIX = {"bert": "bert.", "distilbert": "distilbert.", "albert": "albert."}
