"""Mean pooling (`pooling="mean"`): the head reads the attention-masked token mean of the last
hidden state (sentence-transformers' convention), not [CLS] through the pooler."""

import json

import jax
import numpy as np
import pytest

from fedjax_lm.models import from_pretrained, minilm_path
from fedjax_lm.models.errors import ModelLoadError
from fedjax_lm.models.export import export_merged
from tests.models.test_encoder import make_batch, tiny


def st_mean_pooling(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """sentence-transformers' `mean_pooling` (the all-MiniLM-L6-v2 model card), in numpy."""
    m = mask[..., None].astype(np.float64)
    return (hidden * m).sum(1) / np.clip(m.sum(1), 1e-9, None)


def numpy_head(arch: str, head: dict, pooled: np.ndarray) -> np.ndarray:
    if arch == "distilbert":
        pre = head["pre_classifier"]
        pooled = np.maximum(pooled @ np.asarray(pre["kernel"]) + np.asarray(pre["bias"]), 0)
    c = head["classifier"]
    return pooled @ np.asarray(c["kernel"]) + np.asarray(c["bias"])


@pytest.mark.parametrize("arch", ["bert", "distilbert", "albert"])
def test_mean_pooled_logits_equal_a_numpy_reference_and_ignore_padding(arch):
    model = tiny(arch, pooling="mean")
    params = model.init(jax.random.key(0))
    assert "pooler" not in params  # no pooler is stored (or sent) when nothing reads it
    batch = {k: v for k, v in make_batch().items() if k not in ("label", "mask")}
    out = model.apply(params, batch, train=False)
    hidden = np.asarray(out.last_hidden_state, np.float64)
    want = numpy_head(arch, params["head"], st_mean_pooling(hidden, batch["attention_mask"]))
    np.testing.assert_allclose(np.asarray(out.logits), want, rtol=1e-5, atol=1e-5)
    # Two more padding positions change nothing: padding is outside the mean (and attention).
    padded = {k: np.pad(v, ((0, 0), (0, 2))) for k, v in batch.items()}
    again = model.apply(params, padded, train=False).logits
    np.testing.assert_allclose(np.asarray(again), np.asarray(out.logits), atol=1e-5)
    cls_logits = numpy_head(arch, params["head"], hidden[:, 0])  # what reading [CLS] would give
    assert not np.allclose(np.asarray(out.logits), cls_logits, atol=1e-3)


def test_cls_pooling_keeps_the_pooler_and_mean_is_refused_unknown():
    assert "pooler" in tiny("bert").init(jax.random.key(0))
    with pytest.raises(ModelLoadError, match=r"pooling must be one of \('cls', 'mean'\), got "
                                             r"'max'"):
        tiny("bert", pooling="max")


@pytest.mark.slow  # loads MiniLM twice (~10 s)
def test_minilm_with_mean_pooling_is_its_sentence_transformers_embedding_before_the_head():
    """MiniLM declares mean-token pooling itself; ours loads its body unchanged without the
    pooler, and its pooled vector is the sentence-transformers mean (before normalisation)."""
    pooling = json.loads((minilm_path() / "1_Pooling" / "config.json").read_text())
    assert pooling["pooling_mode_mean_tokens"] and not pooling["pooling_mode_cls_token"]
    cls = from_pretrained(minilm_path(), 2, head_seed=0, load_tokenizer=False)
    mean = from_pretrained(minilm_path(), 2, head_seed=0, pooling="mean", load_tokenizer=False)
    assert "pooler" in cls.params and "pooler" not in mean.params
    for key in ("embeddings", "layers", "head"):
        jax.tree.map(np.testing.assert_array_equal, cls.params[key], mean.params[key])
    batch = {k: v for k, v in make_batch(length=6).items() if k not in ("label", "mask")}
    out = mean.model.apply(mean.params, batch, train=False)
    pooled = st_mean_pooling(np.asarray(out.last_hidden_state, np.float64),
                             batch["attention_mask"])
    want = numpy_head("bert", mean.params["head"], pooled)
    np.testing.assert_allclose(np.asarray(out.logits), want, rtol=1e-4, atol=1e-5)


def test_a_mean_pooled_model_is_not_exported_as_a_transformers_classifier(tmp_path):
    model = tiny("bert", pooling="mean")
    with pytest.raises(ValueError, match=r"^pooling=mean has no transformers class"):
        export_merged(model.config, model.init(jax.random.key(0)), tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
