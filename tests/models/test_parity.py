"""Parity with Hugging Face PyTorch: tiny random BERT / DistilBERT / ALBERT and real MiniLM.

References were written by tools/make_parity_fixtures.py (torch, eager attention).
"""

from pathlib import Path

import jax
import numpy as np
import pytest

from fedjax_lm.models import from_pretrained

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "parity"
TOL = 1e-4


def _apply(loaded, batch: dict):
    return jax.jit(lambda p, b: loaded.model.apply(p, b, train=False))(loaded.params, batch)


def _batch(ref, arch: str, with_mask: bool = True) -> dict:
    batch = {"input_ids": ref["input_ids"].astype(np.int32)}
    if with_mask:
        batch["attention_mask"] = ref["attention_mask"].astype(np.int32)
    if arch != "distilbert":
        batch["token_type_ids"] = ref["token_type_ids"].astype(np.int32)
    return batch


@pytest.mark.parametrize("arch", ["bert", "distilbert", "albert"])
def test_tiny_random_matches_pytorch_with_and_without_mask(arch):
    ref = np.load(FIXTURES / arch / "expected.npz")
    loaded = from_pretrained(FIXTURES / arch, num_labels=3, load_tokenizer=False)
    assert loaded.config.model_type == arch
    out = _apply(loaded, _batch(ref, arch))
    np.testing.assert_allclose(out.logits, ref["logits_masked"], atol=TOL, rtol=0)
    np.testing.assert_allclose(out.last_hidden_state, ref["hidden_masked"], atol=TOL, rtol=0)

    # No mask passed (HF attention_mask=None) == attend to padding.
    out = _apply(loaded, _batch(ref, arch, with_mask=False))
    np.testing.assert_allclose(out.logits, ref["logits_nomask"], atol=TOL, rtol=0)
    np.testing.assert_allclose(out.last_hidden_state, ref["hidden_nomask"], atol=TOL, rtol=0)

    # attend_to_padding ignores a given mask: same as HF without a mask.
    unmasked = from_pretrained(
        FIXTURES / arch, num_labels=3, load_tokenizer=False, attend_to_padding=True
    )
    out = _apply(unmasked, _batch(ref, arch))
    np.testing.assert_allclose(out.logits, ref["logits_nomask"], atol=TOL, rtol=0)
    assert np.abs(ref["logits_nomask"] - ref["logits_masked"]).max() > 1e-3  # padding matters


@pytest.fixture(scope="module")
def minilm():
    return from_pretrained("minilm", num_labels=2)


def test_minilm_matches_pytorch_reference(minilm):
    ref = np.load(FIXTURES / "minilm_reference.npz")
    enc = minilm.tokenizer(
        [
            "Federated learning keeps the data on the clients.",
            "A short one.",
            "The server averages the models after every round of local training.",
        ],
        padding=True,
        return_tensors="np",
    )
    np.testing.assert_array_equal(enc["input_ids"], ref["input_ids"])  # same tokenizer
    out = _apply(minilm, _batch(ref, "bert"))
    np.testing.assert_allclose(
        out.last_hidden_state[..., :8], ref["hidden_slice"], atol=TOL, rtol=0
    )


def test_minilm_classifies_offline(minilm):
    assert minilm.config.hidden_size == 384 and minilm.config.num_hidden_layers == 6
    enc = minilm.tokenizer(["good", "bad movie"], padding=True, return_tensors="np")
    out = _apply(minilm, dict(enc))
    assert out.logits.shape == (2, 2)
    assert np.isfinite(out.logits).all()


def test_minilm_distil_is_the_same_function_for_token_type_zero(minilm):
    distil = from_pretrained("minilm-distil", num_labels=2)
    assert distil.config.model_type == "distilbert" and distil.config.type_vocab_size == 0
    assert "pooler" not in distil.params and "pre_classifier" in distil.params["head"]
    ref = np.load(FIXTURES / "minilm_reference.npz")
    bert_out = _apply(minilm, _batch(ref, "bert"))
    distil_out = _apply(distil, _batch(ref, "distilbert"))
    np.testing.assert_allclose(
        distil_out.last_hidden_state, bert_out.last_hidden_state, atol=TOL, rtol=0
    )
