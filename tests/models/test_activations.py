"""Activation modules against numpy references; ABU variants, adaptive scaling, blend_weights."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fedjax_lm.models.activations import (
    ABU_BASES,
    ABU_VARIANTS,
    ACTIVATIONS,
    blend_weights,
    make_activation,
    normalize_blend,
)

X = np.linspace(-3.0, 2.5, 12).astype(np.float32)
W = np.array([0.5, -0.3, 1.2, 0.1, 0.4], np.float32)  # one negative entry, Σw = 1.9
BETA = 1.7


def _np_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


NP_FIXED = {
    "identity": lambda x: x,
    "tanh": np.tanh,
    "relu": lambda x: np.maximum(x, 0.0),
    "elu": lambda x: np.where(x > 0, x, np.expm1(x)),
    "selu": lambda x: 1.0507009873554805 * np.where(x > 0, x, 1.6732632423543772 * np.expm1(x)),
    "swish": lambda x: x * _np_sigmoid(x),
    "gelu": lambda x: np.array([0.5 * v * (1.0 + math.erf(v / math.sqrt(2.0))) for v in x]),
    "gelu_new": lambda x: 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3))),
}
NP_FIXED["gelu_pytorch_tanh"] = NP_FIXED["gelu_new"]


def _np_bases(x, beta):
    return np.stack(
        [np.tanh(x), NP_FIXED["elu"](x), np.maximum(x, 0.0), x, x * _np_sigmoid(beta * x)]
    )


def _np_normalize(w, variant):
    if variant == "abu":
        return w
    if variant == "abu_n":
        return w / w.sum()
    if variant == "abu_a":
        return w / np.abs(w).sum()
    if variant == "abu_s":
        e = np.exp(w - w.max())
        return e / e.sum()
    p = np.maximum(w, 0.0)
    return p / p.sum()


def _abu(variant, w, beta=1.0):
    act = make_activation(variant, rngs=nnx.Rngs(0))
    getattr(act, f"{variant}_w")[...] = jnp.asarray(w, jnp.float32)
    act.beta[...] = jnp.float32(beta)
    return act


def test_activation_names():
    assert set(ABU_VARIANTS) <= set(ACTIVATIONS)
    for base in ("identity", "tanh", "relu", "elu", "selu", "swish"):
        assert base in ACTIVATIONS and f"scaled_{base}" in ACTIVATIONS
    assert {"gelu", "gelu_new", "gelu_pytorch_tanh"} <= set(ACTIVATIONS)
    assert len(set(ACTIVATIONS)) == len(ACTIVATIONS) == 20


@pytest.mark.parametrize("name", list(NP_FIXED))
def test_fixed_matches_numpy(name):
    act = make_activation(name, rngs=nnx.Rngs(0))
    assert nnx.state(act, nnx.Param) == nnx.State({})  # parameter-free
    np.testing.assert_allclose(act(jnp.asarray(X)), NP_FIXED[name](X), rtol=1e-5, atol=1e-6)


def test_gelu_flavours_differ():
    x = jnp.asarray(X)
    exact = make_activation("gelu", rngs=nnx.Rngs(0))(x)
    approx = make_activation("gelu_new", rngs=nnx.Rngs(0))(x)
    assert 1e-5 < float(jnp.max(jnp.abs(exact - approx))) < 1e-2


@pytest.mark.parametrize("variant", ABU_VARIANTS)
def test_abu_init_is_uniform_blend(variant):
    act = make_activation(variant, rngs=nnx.Rngs(0))
    params = nnx.to_pure_dict(nnx.state(act, nnx.Param))
    np.testing.assert_array_equal(params[f"{variant}_w"], np.full(5, 0.2, np.float32))
    np.testing.assert_array_equal(params["beta"], np.float32(1.0))
    # All variants agree at init: the guards change nothing there.
    expected = _np_bases(X, 1.0).mean(axis=0)
    np.testing.assert_allclose(act(jnp.asarray(X)), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", ABU_VARIANTS)
def test_abu_matches_hand_computation(variant):
    out = _abu(variant, W, BETA)(jnp.asarray(X))
    expected = _np_normalize(W, variant) @ _np_bases(X, BETA)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", ABU_VARIANTS)
@pytest.mark.parametrize("j", range(5))
def test_one_hot_weights_reproduce_base(variant, j):
    # softmax needs a large logit gap to become one-hot; the other variants are one-hot as is.
    w = np.eye(5, dtype=np.float32)[j] * (60.0 if variant == "abu_s" else 1.0)
    out = _abu(variant, w, 1.0)(jnp.asarray(X))
    ref = make_activation(ABU_BASES[j], rngs=nnx.Rngs(0))(jnp.asarray(X))
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-7)


def test_variants_normalise_as_specified():
    w = jnp.asarray(W)
    np.testing.assert_array_equal(normalize_blend(w, "abu"), W)
    np.testing.assert_allclose(jnp.sum(normalize_blend(w, "abu_n")), 1.0, rtol=1e-6)
    np.testing.assert_allclose(jnp.sum(jnp.abs(normalize_blend(w, "abu_a"))), 1.0, rtol=1e-6)
    s = normalize_blend(w, "abu_s")
    np.testing.assert_allclose(jnp.sum(s), 1.0, rtol=1e-6)
    assert bool(jnp.all(s > 0))
    p = normalize_blend(w, "abu_p")
    np.testing.assert_allclose(jnp.sum(p), 1.0, rtol=1e-6)
    assert float(p[1]) == 0.0 and bool(jnp.all(p >= 0))
    # Sign is kept by abu_n / abu_a (they are not projections onto the simplex).
    assert float(normalize_blend(w, "abu_n")[1]) < 0 and float(normalize_blend(w, "abu_a")[1]) < 0
    # Stacked weights normalise per row.
    stacked = jnp.stack([w, 2.0 * w])
    np.testing.assert_allclose(normalize_blend(stacked, "abu_n").sum(-1), [1.0, 1.0], rtol=1e-6)


def test_abu_n_a_p_coincide_while_every_weight_is_positive():
    """Why the short CIFAR study gives ABU_N, ABU_A and ABU_P identical runs: for w > 0,
    Σw = Σ|w| = Σmax(w, 0), so the three variants (and their gradients) are one function
    until some blend weight crosses zero."""
    def loss(w, variant):
        return jnp.sum(normalize_blend(w, variant) * jnp.arange(1.0, 6.0) ** 2)

    pos = jnp.asarray([0.3, 0.1, 0.25, 0.2, 0.15])
    for v in ("abu_a", "abu_p"):
        np.testing.assert_array_equal(normalize_blend(pos, v), normalize_blend(pos, "abu_n"))
        np.testing.assert_allclose(jax.grad(loss)(pos, v), jax.grad(loss)(pos, "abu_n"),
                                   rtol=1e-6)
    mixed = pos.at[1].set(-0.1)
    outs = [np.asarray(normalize_blend(mixed, v)) for v in ("abu_n", "abu_a", "abu_p")]
    assert not np.allclose(outs[0], outs[1]) and not np.allclose(outs[1], outs[2])


def test_degenerate_sums_are_guarded():
    zero_sum = jnp.array([1.0, -1.0, 0.0, 0.0, 0.0])
    all_neg = -jnp.ones(5)
    for w, variant in [(zero_sum, "abu_n"), (jnp.zeros(5), "abu_a"), (all_neg, "abu_p")]:
        assert bool(jnp.all(jnp.isfinite(normalize_blend(w, variant))))
        assert bool(jnp.all(jnp.isfinite(_abu(variant, w)(jnp.asarray(X)))))
    np.testing.assert_array_equal(normalize_blend(all_neg, "abu_p"), np.zeros(5))


def _param_grads(act, x):
    graphdef, params = nnx.split(act, nnx.Param)
    loss = lambda p: jnp.sum(nnx.merge(graphdef, p)(x) ** 2)
    return nnx.to_pure_dict(jax.grad(loss)(params))


@pytest.mark.parametrize("variant", ABU_VARIANTS)
def test_gradients_reach_blend_weights_and_beta(variant):
    act = make_activation(variant, rngs=nnx.Rngs(0))  # at init
    grads = _param_grads(act, jnp.asarray(X))
    assert set(grads) == {f"{variant}_w", "beta"}
    assert bool(jnp.all(grads[f"{variant}_w"] != 0)), grads
    assert float(grads["beta"]) != 0.0


@pytest.mark.parametrize("base", ["identity", "tanh", "relu", "elu", "selu", "swish"])
def test_scaled_activation(base):
    act = make_activation(f"scaled_{base}", rngs=nnx.Rngs(0))
    x = jnp.asarray(X)
    np.testing.assert_allclose(act(x), NP_FIXED[base](X), rtol=1e-5, atol=1e-6)  # α = 1 at init
    act.alpha[...] = jnp.float32(2.5)
    np.testing.assert_allclose(act(x), 2.5 * NP_FIXED[base](X), rtol=1e-5, atol=1e-6)
    # d/dα Σ (α g)² = 2α Σ g².
    grads = _param_grads(act, x)
    assert set(grads) == {"alpha"}
    np.testing.assert_allclose(grads["alpha"], 5.0 * np.sum(NP_FIXED[base](X) ** 2), rtol=1e-5)


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="unknown activation 'leaky'") as err:
        make_activation("leaky", rngs=nnx.Rngs(0))
    for name in ACTIVATIONS:
        assert name in str(err.value)
    with pytest.raises(ValueError, match="unknown activation 'scaled_gelu'"):
        make_activation("scaled_gelu", rngs=nnx.Rngs(0))


class _TwoLayers(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.dense = nnx.Linear(2, 2, rngs=rngs)
        self.blocks = nnx.Dict(a=make_activation("abu_a", rngs=rngs))
        self.out_act = make_activation("abu_p", rngs=rngs)
        self.plain = make_activation("scaled_relu", rngs=rngs)


def test_blend_weights_per_layer_and_variant():
    model = _TwoLayers(nnx.Rngs(0))
    model.blocks["a"].abu_a_w[...] = jnp.asarray(W)
    model.out_act.abu_p_w[...] = jnp.asarray(W)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    bw = blend_weights(params)
    assert set(bw) == {"blocks/a", "out_act"}
    assert all(isinstance(v, np.ndarray) and v.shape == (5,) for v in bw.values())
    np.testing.assert_allclose(bw["blocks/a"], W / np.abs(W).sum(), rtol=1e-6)
    np.testing.assert_allclose(np.abs(bw["blocks/a"]).sum(), 1.0, rtol=1e-6)
    np.testing.assert_allclose(bw["out_act"].sum(), 1.0, rtol=1e-6)
    assert bw["out_act"].min() >= 0.0
    # An nnx.State works too, and a leading client axis is kept.
    assert set(blend_weights(nnx.state(model, nnx.Param))) == set(bw)
    stacked = jax.tree.map(lambda a: jnp.stack([a, a]), params)
    assert blend_weights(stacked)["out_act"].shape == (2, 5)
