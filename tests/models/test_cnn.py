"""CIFAR CNNs through the pure model interface: shapes, exact param counts, dropout, masking,
training signal and vmap over a client axis."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_lm.models.activations import blend_weights
from fedjax_lm.models.cnn import (
    image_classification_eval,
    image_classification_loss,
    make_cnn_model,
)

# Hand counts (kernel + bias): LeNet 456 + 2416 + 48120 + 10164 + 850;
# SMCN 4864 + 36928 + 4160 + 102464 + 1573248 + 73920 + 1930.
LENET_PARAMS = 62006
SMCN_PARAMS = 1797514
ABU_PARAMS_PER_LAYER = 6  # 5 blend weights + β


@functools.cache
def _model(name, activation="relu"):
    return make_cnn_model(name, 10, activation)


@functools.cache
def _params(name, activation="relu", seed=0):
    return _model(name, activation).init(jax.random.key(seed))


@functools.cache
def _value_and_grad(name, activation="relu"):
    """One compiled training-mode value_and_grad per model, shared by tests to save compiles."""
    loss_fn = image_classification_loss(_model(name, activation))
    return jax.jit(jax.value_and_grad(loss_fn, has_aux=True))


def _batch(n, seed=0, mask=None):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {
        "image": jax.random.normal(k1, (n, 32, 32, 3), jnp.float32),
        "label": jax.random.randint(k2, (n,), 0, 10),
        "mask": jnp.ones(n, jnp.float32) if mask is None else jnp.asarray(mask, jnp.float32),
    }


def _count(params):
    return sum(int(x.size) for x in jax.tree.leaves(params))


@pytest.mark.parametrize("name", ["lenet", "smcn"])
def test_output_shape_and_plain_params(name):
    params = _params(name)
    assert isinstance(params, dict)
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(params))
    logits = _model(name).apply(params, _batch(2), train=False)
    assert logits.shape == (2, 10) and logits.dtype == jnp.float32


def test_param_counts():
    assert _count(_params("lenet")) == LENET_PARAMS
    assert _count(_params("smcn")) == SMCN_PARAMS
    abu = jax.eval_shape(_model("lenet", "abu_n").init, jax.random.key(0))
    assert _count(abu) == LENET_PARAMS + 4 * ABU_PARAMS_PER_LAYER
    abu = jax.eval_shape(_model("smcn", "scaled_relu").init, jax.random.key(0))
    assert _count(abu) == SMCN_PARAMS + 6  # one α per layer
    # Width 16: convs 1216 + 2320 + 272 + 6416, fc 8·8·16→96 (98400), 96→48 (4656), 48→10 (490).
    narrow = make_cnn_model("smcn", 10, "relu", width=16)
    assert _count(jax.eval_shape(narrow.init, jax.random.key(0))) == 113770


def test_smcn_dropout_only_in_training():
    model, params, batch = _model("smcn"), _params("smcn"), _batch(2)
    apply = jax.jit(model.apply, static_argnames="train")
    k1, k2 = jax.random.key(1), jax.random.key(2)
    eval_none = apply(params, batch, train=False)
    np.testing.assert_array_equal(apply(params, batch, train=False, rng=k1), eval_none)
    train1 = apply(params, batch, train=True, rng=k1)
    np.testing.assert_array_equal(apply(params, batch, train=True, rng=k1), train1)
    assert not np.allclose(train1, eval_none)
    assert not np.allclose(train1, apply(params, batch, train=True, rng=k2))
    with pytest.raises(ValueError, match="needs an rng"):
        model.apply(params, batch, train=True)


def test_lenet_has_no_dropout():
    model, params, batch = _model("lenet"), _params("lenet"), _batch(2)
    np.testing.assert_array_equal(
        model.apply(params, batch, train=True, rng=jax.random.key(3)),
        model.apply(params, batch, train=False),
    )


def test_loss_and_aux_match_numpy_reference():
    model, params = _model("lenet"), _params("lenet")
    batch = _batch(5, mask=[1, 1, 0, 1, 0])
    loss, aux = image_classification_loss(model)(params, batch, jax.random.key(0))
    logits = np.asarray(model.apply(params, batch, train=False), np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    ce = -logp[np.arange(5), np.asarray(batch["label"])]
    real = np.array([0, 1, 3])
    np.testing.assert_allclose(loss, ce[real].mean(), rtol=1e-5)
    np.testing.assert_allclose(aux["loss_sum"], ce[real].sum(), rtol=1e-5)
    assert float(aux["count"]) == 3.0
    correct = (logits.argmax(-1) == np.asarray(batch["label"]))[real].sum()
    assert float(aux["correct"]) == correct
    assert all(v.dtype == jnp.float32 and v.shape == () for v in aux.values())
    eval_aux = image_classification_eval(model)(params, batch)
    for key in aux:
        np.testing.assert_allclose(eval_aux[key], aux[key], rtol=1e-6)
    # An all-padding batch gives zero loss, not NaN.
    empty = dict(batch, mask=jnp.zeros(5))
    assert float(image_classification_loss(model)(params, empty, jax.random.key(0))[0]) == 0.0


@pytest.mark.parametrize(("name", "activation"), [("lenet", "relu"), ("smcn", "abu_n")])
def test_masked_examples_do_not_affect_loss_or_grad(name, activation):
    params, grad_fn = _params(name, activation), _value_and_grad(name, activation)
    batch = _batch(4, mask=[1, 0, 1, 1])
    changed = dict(
        batch,
        image=batch["image"].at[1].set(7.0),
        label=batch["label"].at[1].set((batch["label"][1] + 3) % 10),
    )
    rng = jax.random.key(4)
    (loss_a, aux_a), grads_a = grad_fn(params, batch, rng)
    (loss_b, aux_b), grads_b = grad_fn(params, changed, rng)
    np.testing.assert_allclose(loss_a, loss_b, rtol=1e-6)
    for key in aux_a:
        np.testing.assert_allclose(aux_a[key], aux_b[key], rtol=1e-6)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8), grads_a, grads_b
    )
    assert _count(grads_a) == _count(params)


@pytest.mark.parametrize(
    ("name", "activation"), [("lenet", "relu"), ("smcn", "relu"), ("smcn", "abu_n")]
)
def test_adam_steps_reduce_loss(name, activation):
    params, grad_fn = _params(name, activation), _value_and_grad(name, activation)
    batch = _batch(4, seed=1)
    # One fixed dropout key makes the objective deterministic, so the test is not flaky.
    rng = jax.random.key(5)
    opt = optax.adam(1e-3)
    new, state, losses = params, opt.init(params), []
    for _ in range(6):
        (loss, _), grads = grad_fn(new, batch, rng)
        updates, state = opt.update(grads, state, new)
        new = optax.apply_updates(new, updates)
        losses.append(float(loss))
    losses.append(float(grad_fn(new, batch, rng)[0][0]))
    assert losses[-1] < 0.5 * losses[0], losses
    if activation.startswith("abu"):
        bw_before, bw_after = blend_weights(params), blend_weights(new)
        assert set(bw_after) == {f"act{i}" for i in range(1, 7)}
        for key, w in bw_after.items():
            np.testing.assert_allclose(w.sum(), 1.0, rtol=1e-5)
            assert not np.allclose(w, bw_before[key])  # the blend adapted


def test_vmap_over_stacked_clients():
    model = _model("lenet")
    single = [_params("lenet", seed=0), _params("lenet", seed=1)]
    params = jax.tree.map(lambda a, b: jnp.stack([a, b]), *single)  # [2, ...] leaves
    batches = [_batch(4, seed=s, mask=[1, 1, 0, 1]) for s in (1, 2)]
    stacked = jax.tree.map(lambda a, b: jnp.stack([a, b]), *batches)
    rngs = jax.random.split(jax.random.key(1), 2)
    losses, aux = jax.jit(jax.vmap(image_classification_loss(model)))(params, stacked, rngs)
    assert losses.shape == (2,) and aux["count"].shape == (2,)
    for c in range(2):
        (ref, _), _ = _value_and_grad("lenet")(single[c], batches[c], rngs[c])
        np.testing.assert_allclose(losses[c], ref, rtol=1e-5)
    assert float(losses[0]) != float(losses[1])
    # SMCN (dropout keys split per client) with ABU params also traces under vmap.
    smcn_params = jax.eval_shape(
        jax.vmap(_model("smcn", "abu_n").init), jax.random.split(jax.random.key(0), 2)
    )
    out = jax.eval_shape(
        jax.vmap(image_classification_loss(_model("smcn", "abu_n"))), smcn_params, stacked, rngs
    )
    assert out[0].shape == (2,)


def test_unknown_cnn_name():
    with pytest.raises(ValueError, match="unknown CNN 'resnet'; valid: lenet, smcn"):
        make_cnn_model("resnet", 10, "relu")


def test_smcn_paper_init_matches_the_authors_tf_initialisers():
    """Truncated normal (cut at ±2σ) with σ = sqrt(2 / (kh·kw·in)) for convs and
    sqrt(2 / (in·out)) for dense kernels; biases 0 for conv1, 0.1 elsewhere."""
    params = make_cnn_model("smcn", 10, "relu", width=16, init="paper").init(jax.random.key(0))
    trunc_std = 0.8796  # std of N(0, 1) truncated to [-2, 2]
    for name in ("conv1", "conv2", "conv4", "fc1", "fc2"):
        k = np.asarray(params[name]["kernel"])
        fan = np.prod(k.shape[:-1]) if name.startswith("conv") else np.prod(k.shape)
        sigma = np.sqrt(2.0 / fan)
        assert np.abs(k).max() <= 2 * sigma * (1 + 1e-6)
        np.testing.assert_allclose(k.std(), trunc_std * sigma, rtol=0.1)
    assert np.all(np.asarray(params["conv1"]["bias"]) == 0.0)
    for name in ("conv2", "conv3", "conv4", "fc1", "fc2", "fc3"):
        np.testing.assert_array_equal(np.asarray(params[name]["bias"]), np.float32(0.1))
    flax = make_cnn_model("smcn", 10, "relu", width=16).init(jax.random.key(0))
    assert np.all(np.asarray(flax["conv2"]["bias"]) == 0.0)  # the default init is unchanged
    with pytest.raises(ValueError, match="unknown init 'he'; valid: flax, paper"):
        make_cnn_model("smcn", 10, "relu", init="he")
