"""Writing our params as a Hugging Face folder (config.json + model.safetensors [+ tokenizer]),
with LoRA merged into the base: the inverse of `checkpoint.load_params`.

Tensor names come from the same table the loader reads (`hf_weights.hf_sources`), with the
architecture prefix of `*ForSequenceClassification`; `config.json` holds the fields
`config.config_from_hf` reads back, under each architecture's own names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from fedjax_lm.io import write_json
from fedjax_lm.models.checkpoint import SAFETENSORS, _leaf
from fedjax_lm.models.config import EncoderConfig
from fedjax_lm.models.hf_weights import ARCH_PREFIX, hf_sources
from fedjax_lm.models.peft import merge_lora

_ARCHITECTURES = {"bert": "BertForSequenceClassification",
                  "distilbert": "DistilBertForSequenceClassification",
                  "albert": "AlbertForSequenceClassification"}


def hf_config(cfg: EncoderConfig) -> dict[str, Any]:
    """`cfg` as a Hugging Face config.json (LoRA fields dropped: the export is merged)."""
    labels = {str(i): f"LABEL_{i}" for i in range(cfg.num_labels)}
    common = {"model_type": cfg.model_type, "architectures": [_ARCHITECTURES[cfg.model_type]],
              "id2label": labels, "label2id": {v: int(k) for k, v in labels.items()},
              "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.max_position_embeddings,
              "initializer_range": cfg.initializer_range, "pad_token_id": cfg.pad_token_id}
    if cfg.model_type == "distilbert":
        return common | {
            "dim": cfg.hidden_size, "n_layers": cfg.num_hidden_layers,
            "n_heads": cfg.num_attention_heads, "hidden_dim": cfg.intermediate_size,
            "activation": cfg.hidden_act, "dropout": cfg.hidden_dropout_prob,
            "attention_dropout": cfg.attention_probs_dropout_prob,
            "seq_classif_dropout": cfg.classifier_dropout_prob}
    out = common | {
        "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "intermediate_size": cfg.intermediate_size, "hidden_act": cfg.hidden_act,
        "hidden_dropout_prob": cfg.hidden_dropout_prob,
        "attention_probs_dropout_prob": cfg.attention_probs_dropout_prob,
        "type_vocab_size": cfg.type_vocab_size, "layer_norm_eps": cfg.layer_norm_eps,
        "position_embedding_type": "absolute"}
    if cfg.model_type == "albert":
        return out | {"embedding_size": cfg.embedding_size,
                      "num_hidden_groups": cfg.num_hidden_groups,
                      "inner_group_num": cfg.inner_group_num,
                      "classifier_dropout_prob": cfg.classifier_dropout_prob}
    return out | {"classifier_dropout": cfg.classifier_dropout_prob}


def hf_tensors(cfg: EncoderConfig, params: Any) -> dict[str, np.ndarray]:
    """Our (merged) params under Hugging Face tensor names ([out, in] Linear weights)."""
    prefix = ARCH_PREFIX[cfg.model_type]
    out = {}
    for path, src in hf_sources(cfg).items():
        value = np.asarray(_leaf(params, path), np.float32)
        name = src.names[0] if src.in_head else prefix + src.names[0]
        out[name] = np.ascontiguousarray(value.T if src.transpose else value)
    return out


def unexportable(pooling: str) -> str | None:
    """Why a model pooling this way has no transformers class to export to, or None."""
    if pooling != "cls":
        return (f"pooling={pooling} has no transformers class (*ForSequenceClassification reads "
                "[CLS], through the pooler), so a merged export would classify differently; "
                "train with --pooling cls to export")
    return None


def export_merged(cfg: EncoderConfig, params: Any, out: Path, tokenizer: Any = None) -> Path:
    """Write `params` (adapters merged: W + (alpha/R)·A B) as a Hugging Face folder; a config
    no transformers class computes (`unexportable`) is refused with ValueError."""
    if reason := unexportable(cfg.pooling):
        raise ValueError(reason)
    if cfg.lora_rank:
        params = merge_lora(params, cfg.lora_alpha / cfg.lora_rank)
    out.mkdir(parents=True, exist_ok=True)
    save_file(hf_tensors(cfg, params), str(out / SAFETENSORS))
    write_json(out / "config.json", hf_config(cfg))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out
