"""max_pool (strided views) equals flax's reduce_window max pool, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fedjax_lm.models.pool import max_pool

CASES = [((2, 28, 28, 3), 2, 2, "VALID"),  # LeNet / pfl CNN: non-overlapping
         ((2, 15, 14, 2), 2, 2, "VALID"),  # odd size: the last row is dropped
         ((1, 9, 9, 2), 3, 2, "VALID"),    # overlapping windows
         ((2, 32, 32, 4), 3, 2, "SAME"),   # smcn's 3/2 pools
         ((2, 15, 15, 4), 3, 2, "SAME")]   # uneven SAME padding


@pytest.mark.parametrize("shape,window,stride,padding", CASES)
def test_matches_flax_max_pool_values_and_gradients(shape, window, stride, padding):
    rng = np.random.default_rng(sum(shape) + window)
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)

    def ref(x):
        return nnx.max_pool(x, (window, window), strides=(stride, stride), padding=padding)

    got = max_pool(x, window, stride, padding)
    np.testing.assert_array_equal(got, ref(x))
    cot = jnp.asarray(rng.normal(size=got.shape), jnp.float32)
    want_g = jax.grad(lambda x: (ref(x) * cot).sum())(x)
    got_g = jax.grad(lambda x: (max_pool(x, window, stride, padding) * cot).sum())(x)
    np.testing.assert_allclose(got_g, want_g, rtol=1e-6, atol=1e-6)


def test_ties_split_the_gradient_and_relu_zeros_get_none():
    x = jnp.array([[1.0, 1.0], [0.0, -2.0]]).reshape(1, 2, 2, 1)
    g = jax.grad(lambda x: max_pool(x, 2, 2).sum())(x)
    np.testing.assert_allclose(g.reshape(2, 2), [[0.5, 0.5], [0.0, 0.0]])
    # After a ReLU, a window of zeros passes no gradient back through the ReLU either way.
    z = jnp.array([-1.0, -3.0, -0.5, -2.0]).reshape(1, 2, 2, 1)
    g = jax.grad(lambda z: max_pool(jax.nn.relu(z), 2, 2).sum())(z)
    np.testing.assert_array_equal(g, jnp.zeros_like(z))


def test_unknown_padding_is_refused():
    with pytest.raises(ValueError, match="unknown padding 'FULL'"):
        max_pool(jnp.zeros((1, 4, 4, 1)), 2, 2, "FULL")
