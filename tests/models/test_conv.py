"""The two conv lowerings compute the same function: against numpy, alone and vmapped over
clients with per-client kernels (the engine's case), and through gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lm.models.cnn import make_cnn_model
from fedjax_lm.models.conv import conv2d_same, conv2d_valid


def _numpy_conv(x: np.ndarray, k: np.ndarray, b: np.ndarray) -> np.ndarray:
    kh, kw, _, cout = k.shape
    n, h, w, _ = x.shape
    out = np.zeros((n, h - kh + 1, w - kw + 1, cout))
    for i in range(h - kh + 1):
        for j in range(w - kw + 1):
            out[:, i, j] = np.einsum("nhwc,hwco->no", x[:, i:i + kh, j:j + kw], k)
    return out + b


@pytest.mark.parametrize("impl", ["xla", "patches"])
def test_conv_matches_numpy(impl):
    rng = np.random.default_rng(0)
    x, k, b = rng.normal(size=(2, 7, 6, 3)), rng.normal(size=(3, 2, 3, 4)), rng.normal(size=4)
    got = conv2d_valid(jnp.asarray(x, jnp.float32), jnp.asarray(k, jnp.float32),
                       jnp.asarray(b, jnp.float32), impl)
    np.testing.assert_allclose(np.asarray(got), _numpy_conv(x, k, b), rtol=1e-5, atol=1e-5)


def test_lowerings_agree_vmapped_over_per_client_kernels_with_gradients():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(3, 2, 6, 6, 2)), jnp.float32)  # [clients, B, H, W, C]
    k = jnp.asarray(rng.normal(size=(3, 3, 3, 2, 4)), jnp.float32)  # a kernel per client
    b = jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)

    def run(impl):
        f = lambda x, k, b: (conv2d_valid(x, k, b, impl) ** 2).sum()
        return jax.vmap(jax.value_and_grad(f, argnums=(0, 1, 2)))(x, k, b)

    (ref, ref_g), (got, got_g) = run("xla"), run("patches")
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    for g, r in zip(got_g, ref_g, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)


def test_xla_conv_custom_gradients_equal_autodiff_alone_in_a_scan_and_vmapped():
    """The canonical-form gradients of `xla_conv_valid` are autodiff's of XLA's convolution
    (XLA rewrites autodiff's form into this one outside loops), also inside a scan (where
    XLA does not) and vmapped over per-client kernels."""
    from fedjax_lm.models.conv import xla_conv_valid

    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(3, 4, 9, 8, 5)), jnp.float32)  # [clients, B, H, W, C]
    k = jnp.asarray(rng.normal(size=(3, 3, 2, 5, 6)), jnp.float32)
    ref_conv = lambda x, k: jax.lax.conv_general_dilated(
        x, k, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def grads(conv, x, k):
        return jax.grad(lambda x, k: (jnp.sin(conv(x, k)) ** 2).sum(), argnums=(0, 1))(x, k)

    def scanned(conv, x, k):  # two SGD steps on (x, k) inside a scan
        def body(c, _):
            gx, gk = grads(conv, *c)
            return (c[0] - 0.01 * gx, c[1] - 0.01 * gk), None
        return jax.lax.scan(body, (x, k), None, length=2)[0]

    cases = ((grads, (x[0], k[0])), (scanned, (x[0], k[0])),
             (jax.vmap(grads, in_axes=(None, 0, 0)), (x, k)))
    for fn, args in cases:
        f = jax.jit(fn, static_argnums=0)
        for got, ref in zip(f(xla_conv_valid, *args), f(ref_conv, *args), strict=True):
            np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_unknown_impl_is_refused():
    with pytest.raises(ValueError, match="unknown conv impl 'fft'"):
        conv2d_valid(jnp.zeros((1, 3, 3, 1)), jnp.zeros((1, 1, 1, 1)), jnp.zeros(1), "fft")


def _cnn_lowerings_agree(name: str, runs: int, batch: int, **kw):
    """The CNN's two conv lowerings, vmapped over `runs` own weights (clients or seeds):
    the same loss and gradients. Returns the params (xla lowering)."""
    xla, pat = (make_cnn_model(name, 10, conv_impl=c, **kw) for c in ("xla", "patches"))
    keys = jax.random.split(jax.random.key(0), runs)
    params = jax.vmap(xla.init)(keys)
    assert jax.tree.structure(params) == jax.tree.structure(jax.vmap(pat.init)(keys))
    data = {"image": jax.random.normal(jax.random.key(1), (runs, batch, 32, 32, 3)),
            "label": jnp.arange(runs * batch).reshape(runs, batch) % 10}

    def loss(model, p, b, k):
        logits = model.apply(p, b, train=True, rng=k)
        return jax.nn.log_softmax(logits)[jnp.arange(batch), b["label"]].mean()

    drop = jax.random.split(jax.random.key(2), runs)
    ref = jax.vmap(jax.value_and_grad(lambda p, b, k: loss(xla, p, b, k)))(params, data, drop)
    got = jax.vmap(jax.value_and_grad(lambda p, b, k: loss(pat, p, b, k)))(params, data, drop)
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-5)
    for g, r in zip(jax.tree.leaves(got[1]), jax.tree.leaves(ref[1]), strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)
    return params


@pytest.mark.slow
def test_pfl_cnn_lowerings_agree_vmapped_over_clients_with_gradients():
    params = _cnn_lowerings_agree("pfl_cnn", runs=3, batch=4)
    assert params["fc1"]["kernel"].shape == (3, 14 * 14 * 64, 128)


@pytest.mark.parametrize("size", [1, 3, 5])
def test_same_padding_lowerings_agree_vmapped_with_gradients(size):
    rng = np.random.default_rng(size)
    x = jnp.asarray(rng.normal(size=(3, 2, 7, 6, 2)), jnp.float32)  # [runs, B, H, W, C]
    k = jnp.asarray(rng.normal(size=(3, size, size, 2, 4)), jnp.float32)
    b = jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)

    def run(impl):
        f = lambda x, k, b: (conv2d_same(x, k, b, impl) ** 2).sum()
        return jax.vmap(jax.value_and_grad(f, argnums=(0, 1, 2)))(x, k, b)

    (ref, ref_g), (got, got_g) = run("xla"), run("patches")
    assert conv2d_same(x[0], k[0], b[0], "patches").shape == (2, 7, 6, 4)
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    for g, r in zip(got_g, ref_g, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="odd kernel sizes"):
        conv2d_same(x[0], jnp.zeros((2, 2, 2, 4)), b[0], "patches")


def test_smcn_lowerings_agree_vmapped_over_seeds_with_gradients():
    """Paper 3's network, vmapped over seeds as the ABU study runs it, the paper's init."""
    _cnn_lowerings_agree("smcn", runs=2, batch=4, activation="abu_n", width=4, init="paper")


def test_lenet_lowerings_agree_vmapped_over_clients_with_gradients():
    """Paper 2's network, vmapped over clients as its personalisation runs it."""
    params = _cnn_lowerings_agree("lenet", runs=3, batch=4)
    assert params["conv2"]["kernel"].shape == (3, 5, 5, 6, 16)
