"""Our own Flax NNX encoders (BERT, DistilBERT, ALBERT) for sequence classification.

Faithful to Hugging Face semantics and loading its safetensors checkpoints; the engine sees only
the pure `Model.init` / `Model.apply` and the loss/eval functions built from them.
"""

from fedjax_lm.models.api import (
    Model,
    Params,
    build_model,
    classification_eval,
    classification_loss,
)
from fedjax_lm.models.config import PRESETS, EncoderConfig, config_from_hf, preset
from fedjax_lm.models.encoder import EncoderForSequenceClassification, EncoderOutput
from fedjax_lm.models.errors import ModelLoadError
from fedjax_lm.models.pretrained import (
    MINILM,
    MINILM_DISTIL,
    NAMED_MODELS,
    PRESET_PREFIX,
    Pretrained,
    from_pretrained,
    minilm_path,
    pretrained_config,
    suggest_model,
    weights_files,
)
from fedjax_lm.models.stats import classification_stats, masked_classification_stats

__all__ = [
    "MINILM",
    "MINILM_DISTIL",
    "NAMED_MODELS",
    "PRESETS",
    "PRESET_PREFIX",
    "EncoderConfig",
    "EncoderForSequenceClassification",
    "EncoderOutput",
    "Model",
    "ModelLoadError",
    "Params",
    "Pretrained",
    "build_model",
    "classification_eval",
    "classification_loss",
    "classification_stats",
    "config_from_hf",
    "from_pretrained",
    "masked_classification_stats",
    "minilm_path",
    "preset",
    "pretrained_config",
    "weights_files",
    "suggest_model",
]
