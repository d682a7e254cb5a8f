"""The pad token's word-embedding row never trains, as with HF's `nn.Embedding(padding_idx=...)`.

The parity fixtures hold forward outputs only (no gradients or trained weights), so the backward
pass is checked against a numpy transcription of torch's embedding backward instead: every
position's output gradient is added into its token's row, except positions holding
`padding_idx`.
"""

from pathlib import Path

import jax
import numpy as np
import pytest

from fedjax_lm.models import Model, classification_loss, config_from_hf, from_pretrained, preset

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "parity"
PAD = 0


def _batch(arch: str) -> dict:
    ref = np.load(FIXTURES / arch / "expected.npz")
    batch = {
        "input_ids": ref["input_ids"].astype(np.int32),
        "attention_mask": ref["attention_mask"].astype(np.int32),
        "label": np.array([0, 1, 2], np.int32),
    }
    if arch != "distilbert":
        batch["token_type_ids"] = ref["token_type_ids"].astype(np.int32)
    return batch


def _grads(model: Model, params, batch):
    loss = classification_loss(model)
    return jax.jit(jax.grad(lambda p: loss(p, batch, jax.random.key(0))[0]))(params)


def _word_grad(model: Model, params, batch) -> np.ndarray:
    return np.asarray(_grads(model, params, batch)["embeddings"]["word"]["embedding"])


def _load(arch: str, **overrides):
    return from_pretrained(FIXTURES / arch, num_labels=3, load_tokenizer=False, **overrides)


# BERT runs by default; the other encoders share the embedding code (slow: `make test-slow`).
SLOW = pytest.mark.slow


@pytest.mark.parametrize("arch", ["bert", pytest.param("distilbert", marks=SLOW),
                                  pytest.param("albert", marks=SLOW)])
def test_pad_row_gradient_is_zero_when_padding_is_attended(arch):
    loaded = _load(arch, attend_to_padding=True)
    assert loaded.config.pad_token_id == PAD  # read from config.json
    batch = _batch(arch)
    assert (batch["input_ids"] == PAD).any()
    grad = _word_grad(loaded.model, loaded.params, batch)
    assert (grad[PAD] == 0.0).all()
    used = np.unique(batch["input_ids"][batch["input_ids"] != PAD])
    assert (np.abs(grad[used]).max(axis=1) > 0).all()

    # Without the frozen row the pad embedding does get a gradient here: the test has teeth.
    free = Model(loaded.config.replace(pad_token_id=None))
    assert np.abs(_word_grad(free, loaded.params, batch)[PAD]).max() > 1e-6

    # An SGD step leaves the pad row bitwise unchanged.
    grads = _grads(loaded.model, loaded.params, batch)
    params = jax.tree.map(lambda p, g: p - 0.5 * g, loaded.params, grads)
    before = np.asarray(loaded.params["embeddings"]["word"]["embedding"])
    after = np.asarray(params["embeddings"]["word"]["embedding"])
    np.testing.assert_array_equal(after[PAD], before[PAD])
    assert (after[used] != before[used]).any(axis=1).all()


@pytest.mark.slow
def test_pad_id_inside_real_tokens_gets_no_gradient_either():
    loaded = _load("bert")  # masked: padding keys are invisible, but a real token may be id 0
    batch = _batch("bert")
    batch["input_ids"][0, 3] = PAD
    assert batch["attention_mask"][0, 3] == 1
    assert (_word_grad(loaded.model, loaded.params, batch)[PAD] == 0.0).all()
    free = Model(loaded.config.replace(pad_token_id=None))
    assert np.abs(_word_grad(free, loaded.params, batch)[PAD]).max() > 1e-6


@pytest.mark.parametrize("arch", ["bert", pytest.param("albert", marks=SLOW)])
def test_word_gradient_matches_torch_embedding_backward_in_numpy(arch):
    loaded = _load(arch, attend_to_padding=True)
    batch = _batch(arch)
    ids = batch["input_ids"]
    grad = _word_grad(loaded.model, loaded.params, batch)

    # Each position's output gradient: give every position its own row (a copy of its token's),
    # with no frozen row; the same function, so that table's gradient is the per-position one.
    n = ids.size
    per_position = Model(loaded.config.replace(vocab_size=n, pad_token_id=None))
    table = loaded.params["embeddings"]["word"]["embedding"]
    params = jax.tree.map(lambda x: x, loaded.params)
    params["embeddings"]["word"]["embedding"] = table[ids.reshape(-1)]
    positions = dict(batch, input_ids=np.arange(n, dtype=np.int32).reshape(ids.shape))
    out_grad = _word_grad(per_position, params, positions)

    # torch's embedding_dense_backward: index_add of the output gradient, skipping padding_idx.
    expected = np.zeros_like(grad)
    keep = ids.reshape(-1) != PAD
    np.add.at(expected, ids.reshape(-1)[keep], out_grad[keep])
    np.testing.assert_array_equal(grad[PAD], expected[PAD])
    np.testing.assert_allclose(grad, expected, atol=1e-7, rtol=1e-5)


def test_pad_token_id_from_config_and_presets():
    assert preset("tiny").pad_token_id == 0  # like HF's BertConfig
    assert config_from_hf({"model_type": "albert"}).pad_token_id == 0
    assert config_from_hf({"model_type": "bert", "pad_token_id": 3}).pad_token_id == 3
    assert config_from_hf({"model_type": "distilbert", "pad_token_id": None}).pad_token_id is None
    with pytest.raises(ValueError, match="pad_token_id"):
        preset("tiny", vocab_size=10, pad_token_id=10)
