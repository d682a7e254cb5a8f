"""Encoder configuration: one frozen dataclass for BERT, DistilBERT and ALBERT.

The three architectures differ only in a few structural switches (token types, pooler vs.
pre-classifier head, factorised embeddings, layer sharing, where dropout sits), so one config and
one module family cover them; `model_type` selects the switches. Configs come from size presets or
from a Hugging Face `config.json` (whose field names differ per architecture).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from fedjax_lm.models.errors import ModelLoadError
from fedjax_lm.models.hidden_act import hidden_act_names

MODEL_TYPES = ("bert", "distilbert", "albert")
ATTENTION_IMPLS = ("xla", "dot_product")
# What the head reads: "cls" = the first token (BERT / ALBERT through their pretrained tanh
# pooler); "mean" = the attention-masked token mean of the last hidden state, no pooler
# (sentence-transformers' convention, e.g. all-MiniLM-L6-v2, whose pooler was never trained).
POOLINGS = ("cls", "mean")
# LoRA target projections: one naming for the three architectures (see `lora`).
LORA_TARGET_NAMES = ("query", "key", "value", "attention_output", "intermediate", "output")
# The field annotations (strings, under `from __future__ import annotations`) → accepted types.
_TYPES = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,),
          "None": (type(None),), "tuple[str, ...]": (tuple,)}


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """Hyper-parameters of an encoder for sequence classification.

    `attend_to_padding` ignores the attention mask (paper 1's original code passed none).
    `pad_token_id`: the word-embedding row that never trains, as with Hugging Face's
    `nn.Embedding(padding_idx=...)` (None: every row trains).
    `attention_impl`: "xla" (einsum + softmax, HF-exact) or "dot_product"
    (`jax.nn.dot_product_attention`, fused where the backend allows; it has no dropout on the
    attention probabilities, so with it `attention_probs_dropout_prob` is not applied).
    `remat` recomputes each layer in the backward pass (memory for compute). `dtype` is the
    compute dtype, `param_dtype` the storage dtype of the parameters.
    `pooling` (`POOLINGS`): what the classification head reads; "mean" drops the pooler.
    `lora_rank` > 0 adds LoRA adapters (scale `lora_alpha / lora_rank`, dropout `lora_dropout`
    on their input) to the `lora_targets` projections (names in `LORA_TARGET_NAMES`); 0: none.
    """

    model_type: str = "bert"
    vocab_size: int = 1000
    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 2
    intermediate_size: int = 128
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    classifier_dropout_prob: float = 0.1
    max_position_embeddings: int = 128
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    # ALBERT only: factorised embeddings and cross-layer sharing.
    embedding_size: int | None = None
    num_hidden_groups: int = 1
    inner_group_num: int = 1
    num_labels: int = 2
    pad_token_id: int | None = 0  # HF's BertConfig / DistilBertConfig / AlbertConfig default
    attend_to_padding: bool = False
    attention_impl: str = "xla"
    pooling: str = "cls"
    remat: bool = False
    dtype: str = "float32"
    param_dtype: str = "float32"
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        """Every value that would otherwise fail (or silently misbehave) deep inside the model:
        one ModelLoadError, before any parameter exists."""
        for f in dataclasses.fields(self):  # e.g. a config.json with "hidden_size": "384"
            value = getattr(self, f.name)
            allowed = tuple(t for name in f.type.split("|") for t in _TYPES[name.strip()])
            if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
                raise ModelLoadError(f"{f.name} must be {f.type}, got {value!r}")
        if self.model_type not in MODEL_TYPES:
            raise ModelLoadError(
                f"unsupported model_type {self.model_type!r}; supported: {', '.join(MODEL_TYPES)}"
            )
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ModelLoadError(
                f"attention_impl must be one of {ATTENTION_IMPLS}, got {self.attention_impl!r}"
            )
        if self.pooling not in POOLINGS:
            raise ModelLoadError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        sizes = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                 "intermediate_size", "max_position_embeddings", "num_hidden_groups",
                 "inner_group_num")
        for name in sizes:
            if getattr(self, name) < 1:
                raise ModelLoadError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads:
            raise ModelLoadError(
                f"hidden_size {self.hidden_size} is not a multiple of "
                f"num_attention_heads {self.num_attention_heads}"
            )
        if self.hidden_act not in hidden_act_names():
            raise ModelLoadError(f"unknown hidden_act {self.hidden_act!r}; valid: "
                                 f"{', '.join(hidden_act_names())}")
        if self.model_type == "distilbert" and self.type_vocab_size:
            raise ModelLoadError(
                "DistilBERT has no token-type embeddings: type_vocab_size must be 0")
        if self.model_type == "albert" and self.embedding_size is None:
            raise ModelLoadError("ALBERT needs embedding_size (factorised embeddings)")
        if self.model_type != "albert" and (self.num_hidden_groups, self.inner_group_num) != (1, 1):
            raise ModelLoadError("num_hidden_groups / inner_group_num are ALBERT-only")
        if self.num_labels < 1:
            raise ModelLoadError(f"num_labels must be >= 1, got {self.num_labels}")
        if self.pad_token_id is not None and not 0 <= self.pad_token_id < self.vocab_size:
            raise ModelLoadError(
                f"pad_token_id {self.pad_token_id} is not a row of the {self.vocab_size}-word "
                "embedding table"
            )
        self._check_lora()
        for name in ("dtype", "param_dtype"):
            try:
                jnp.dtype(getattr(self, name))
            except TypeError:
                raise ModelLoadError(f"{name} {getattr(self, name)!r} is not a dtype") from None

    def projection_sizes(self) -> dict[str, tuple[int, int]]:
        """(d_in, d_out) of each LoRA target projection."""
        h, i = self.hidden_size, self.intermediate_size
        return {"query": (h, h), "key": (h, h), "value": (h, h), "attention_output": (h, h),
                "intermediate": (h, i), "output": (i, h)}

    def _check_lora(self) -> None:
        if self.lora_rank < 0:
            raise ModelLoadError(f"lora_rank must be >= 0, got {self.lora_rank}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ModelLoadError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        unknown = [t for t in self.lora_targets if t not in LORA_TARGET_NAMES]
        if unknown:
            raise ModelLoadError(f"unknown LoRA target(s) {', '.join(unknown)}; valid: "
                                 f"{', '.join(LORA_TARGET_NAMES)}")
        if self.lora_rank and not self.lora_targets:
            raise ModelLoadError("lora_rank > 0 needs lora_targets (e.g. query,value)")
        sizes = self.projection_sizes()
        for t in self.lora_targets:
            if self.lora_rank > min(sizes[t]):
                raise ModelLoadError(f"lora_rank {self.lora_rank} exceeds projection {t}'s "
                                     f"size {sizes[t][0]}x{sizes[t][1]}; use a rank <= "
                                     f"{min(sizes[t])}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def has_pooler(self) -> bool:
        """BERT / ALBERT's tanh(dense([CLS])) pooler, used (and stored) only by cls pooling."""
        return self.model_type != "distilbert" and self.pooling == "cls"

    @property
    def num_stored_layers(self) -> int:
        """Distinct layers holding parameters (ALBERT shares them across depth)."""
        if self.model_type == "albert":
            return self.num_hidden_groups * self.inner_group_num
        return self.num_hidden_layers

    def layer_schedule(self) -> list[int]:
        """Stored-layer index for each applied layer, in order (HF's ALBERT grouping rule)."""
        if self.model_type != "albert":
            return list(range(self.num_hidden_layers))
        out = []
        for i in range(self.num_hidden_layers):
            group = int(i / (self.num_hidden_layers / self.num_hidden_groups))
            out.extend(group * self.inner_group_num + j for j in range(self.inner_group_num))
        return out

    def replace(self, **overrides: Any) -> EncoderConfig:
        """`dataclasses.replace` with a clear error for unknown field names."""
        fields = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise ValueError(f"unknown EncoderConfig field(s): {', '.join(unknown)}")
        return dataclasses.replace(self, **overrides)


_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=128, vocab_size=1000, max_position_embeddings=128),
    "mini": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                 intermediate_size=1536, vocab_size=30522, max_position_embeddings=512),
    "small": dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8,
                  intermediate_size=2048, vocab_size=30522, max_position_embeddings=512),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072, vocab_size=30522, max_position_embeddings=512),
}
PRESETS = tuple(_PRESETS)


def preset(name: str, model_type: str = "bert", **overrides: Any) -> EncoderConfig:
    """A size preset (`tiny`, `mini`, `small`, `base`) for any of the three architectures."""
    if name not in _PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    fields: dict[str, Any] = dict(_PRESETS[name], model_type=model_type)
    if model_type == "distilbert":
        fields["type_vocab_size"] = 0
    if model_type == "albert":
        fields.update(embedding_size=min(128, fields["hidden_size"]), hidden_act="gelu_new")
    return EncoderConfig(**fields).replace(**overrides)


def _config_path(source: str | Path) -> Path:
    path = Path(source)
    return path / "config.json" if path.is_dir() else path


def _read_json(source: Mapping[str, Any] | str | Path) -> dict[str, Any]:
    if isinstance(source, Mapping):
        return dict(source)
    path = _config_path(source)
    if not path.is_file():
        raise ModelLoadError(f"config file not found: {path}")
    try:
        hf = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path} is not valid JSON ({e}); fix that file, or point --model "
                             "at another model") from e
    if not isinstance(hf, dict):
        raise ModelLoadError(f"{path} holds a JSON {type(hf).__name__}, not an object; fix that "
                             "file, or point --model at another model")
    return hf


def config_from_hf(
    source: Mapping[str, Any] | str | Path, *, num_labels: int | None = None, **overrides: Any
) -> EncoderConfig:
    """Translate a Hugging Face `config.json` (dict, file or folder) into an `EncoderConfig`.

    Missing fields take the Hugging Face class defaults (`pad_token_id` 0; an explicit null
    freezes no row). `num_labels` defaults to the size of `id2label` when present, else 2.
    """
    hf = _read_json(source)
    model_type = hf.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ModelLoadError(
            f"unsupported model_type {model_type!r} in config; supported: {', '.join(MODEL_TYPES)}"
        )
    if num_labels is None:
        num_labels = len(hf["id2label"]) if hf.get("id2label") else 2
    if model_type == "distilbert":
        fields = dict(
            vocab_size=hf.get("vocab_size", 30522),
            hidden_size=hf.get("dim", 768),
            num_hidden_layers=hf.get("n_layers", 6),
            num_attention_heads=hf.get("n_heads", 12),
            intermediate_size=hf.get("hidden_dim", 3072),
            hidden_act=hf.get("activation", "gelu"),
            hidden_dropout_prob=hf.get("dropout", 0.1),
            attention_probs_dropout_prob=hf.get("attention_dropout", 0.1),
            classifier_dropout_prob=hf.get("seq_classif_dropout", 0.2),
            max_position_embeddings=hf.get("max_position_embeddings", 512),
            type_vocab_size=0,
            layer_norm_eps=1e-12,  # hard-coded in HF's DistilBERT
            initializer_range=hf.get("initializer_range", 0.02),
        )
    else:
        pos_type = hf.get("position_embedding_type", "absolute")
        if pos_type != "absolute":
            raise ModelLoadError(f"unsupported position_embedding_type {pos_type!r}")
        is_albert = model_type == "albert"
        dropout = hf.get("hidden_dropout_prob", 0.0 if is_albert else 0.1)
        if is_albert:
            classifier_dropout = hf.get("classifier_dropout_prob", 0.1)
        else:
            classifier_dropout = hf.get("classifier_dropout")
            classifier_dropout = dropout if classifier_dropout is None else classifier_dropout
        fields = dict(
            vocab_size=hf.get("vocab_size", 30000 if is_albert else 30522),
            hidden_size=hf.get("hidden_size", 4096 if is_albert else 768),
            num_hidden_layers=hf.get("num_hidden_layers", 12),
            num_attention_heads=hf.get("num_attention_heads", 64 if is_albert else 12),
            intermediate_size=hf.get("intermediate_size", 16384 if is_albert else 3072),
            hidden_act=hf.get("hidden_act", "gelu_new" if is_albert else "gelu"),
            hidden_dropout_prob=dropout,
            attention_probs_dropout_prob=hf.get(
                "attention_probs_dropout_prob", 0.0 if is_albert else 0.1
            ),
            classifier_dropout_prob=classifier_dropout,
            max_position_embeddings=hf.get("max_position_embeddings", 512),
            type_vocab_size=hf.get("type_vocab_size", 2),
            layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
            initializer_range=hf.get("initializer_range", 0.02),
        )
        if is_albert:
            fields.update(
                embedding_size=hf.get("embedding_size", 128),
                num_hidden_groups=hf.get("num_hidden_groups", 1),
                inner_group_num=hf.get("inner_group_num", 1),
            )
    try:
        config = EncoderConfig(model_type=model_type, num_labels=num_labels,
                               pad_token_id=hf.get("pad_token_id", 0), **fields)
    except ModelLoadError as e:
        where = "config" if isinstance(source, Mapping) else _config_path(source)
        raise ModelLoadError(f"{where}: {e}; fix that config or use another model") from None
    return config.replace(**overrides)
