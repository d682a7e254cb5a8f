"""The one masked classification-statistics helper, against numpy."""

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lm.models import classification_stats, masked_classification_stats


def _data(b: int = 6, k: int = 4):
    rng = np.random.default_rng(0)
    return rng.normal(size=(b, k)).astype(np.float32) * 3, rng.integers(0, k, b).astype(np.int32)


def test_per_example_and_masked_sums_match_numpy():
    logits, labels = _data()
    logp = logits - np.log(np.exp(logits.astype(np.float64)).sum(-1, keepdims=True))
    nll_ref = -logp[np.arange(len(labels)), labels]
    nll, correct = classification_stats(jnp.asarray(logits), jnp.asarray(labels))
    np.testing.assert_allclose(nll, nll_ref, rtol=1e-5)
    np.testing.assert_array_equal(correct, logits.argmax(-1) == labels)

    mask = np.array([1, 0, 1, 1, 0, 1], np.float32)
    loss, aux = masked_classification_stats(logits, {"label": labels, "mask": mask})
    real = mask > 0
    np.testing.assert_allclose(aux["loss_sum"], nll_ref[real].sum(), rtol=1e-5)
    np.testing.assert_allclose(loss, nll_ref[real].mean(), rtol=1e-5)
    assert aux["correct"] == (logits.argmax(-1) == labels)[real].sum() and aux["count"] == 4
    assert all(v.dtype == jnp.float32 and v.shape == () for v in aux.values())


def test_no_mask_means_all_real_and_an_empty_batch_is_zero_not_nan():
    logits, labels = _data()
    full = masked_classification_stats(logits, {"label": labels})
    ones = masked_classification_stats(logits, {"label": labels, "mask": np.ones(6)})
    jax.tree.map(np.testing.assert_array_equal, full, ones)
    loss, aux = masked_classification_stats(logits, {"label": labels, "mask": np.zeros(6)})
    assert float(loss) == 0.0 and float(aux["count"]) == 0.0


def test_log_probs_are_used_as_given():
    """A mixture's blended scores are not normalised: no log_softmax may be applied to them."""
    logits, labels = _data()
    scores = jnp.asarray(logits) - 10.0  # not normalised
    nll, correct = classification_stats(scores, labels, log_probs=True)
    np.testing.assert_array_equal(nll, -np.asarray(scores)[np.arange(6), labels])
    np.testing.assert_array_equal(correct, logits.argmax(-1) == labels)
