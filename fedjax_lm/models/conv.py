"""A 2-D convolution layer with two lowerings of the same function: XLA's convolution, or
patches (im2col) times a matrix.

Why two: the engine vmaps a client's step over the cohort, so every client's conv has its own
kernel. JAX batches a conv whose kernel is batched into one grouped convolution
(`feature_group_count` = clients), which XLA:CPU runs far slower than the same work as a batched
matmul (`benchmarks/results/pfl-cifar10/conv_clients.md`: 14x; even one client at a time,
XLA's conv is 6x slower than patches × matrix at these shapes). With `impl="patches"` the window
extraction has no parameters (under vmap the client axis folds into the batch) and the
per-client part is a batched `dot_general`. Both give the same numbers (to float rounding);
the parameters (`kernel` [kh, kw, in, out], `bias` [out]) are the same either way.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

CONV_IMPLS = ("xla", "patches")


def patches(x: jax.Array, kh: int, kw: int) -> jax.Array:
    """'VALID' stride-1 windows of NHWC `x` as features [B, H-kh+1, W-kw+1, kh·kw·C], ordered
    (row, column, channel) like a flattened HWIO kernel."""
    h, w = x.shape[1] - kh + 1, x.shape[2] - kw + 1
    cols = [x[:, i:i + h, j:j + w, :] for i in range(kh) for j in range(kw)]
    return jnp.concatenate(cols, axis=-1)


def conv2d_valid(x: jax.Array, kernel: jax.Array, bias: jax.Array, impl: str = "xla"
                 ) -> jax.Array:
    """Stride-1 'VALID' convolution of NHWC `x` with an HWIO `kernel`, plus `bias`."""
    if impl == "xla":
        y = jax.lax.conv_general_dilated(x, kernel, (1, 1), "VALID",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
    elif impl == "patches":
        kh, kw, cin, cout = kernel.shape
        y = patches(x, kh, kw) @ kernel.reshape(kh * kw * cin, cout)
    else:
        raise ValueError(f"unknown conv impl {impl!r}; valid: {', '.join(CONV_IMPLS)}")
    return y + bias


def conv2d_same(x: jax.Array, kernel: jax.Array, bias: jax.Array, impl: str = "xla"
                ) -> jax.Array:
    """Stride-1 'SAME' convolution (odd kernel sizes): zero padding, then `conv2d_valid`."""
    kh, kw = kernel.shape[:2]
    if kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(f"'SAME' here takes odd kernel sizes, got {kh}x{kw}")
    if impl == "xla":
        y = jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + bias
    ph, pw = kh // 2, kw // 2
    x = jnp.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
    return conv2d_valid(x, kernel, bias, impl)


class ConvValid(nnx.Module):
    """`nnx.Conv`-like stride-1 'VALID' conv (Glorot-uniform kernel, zero bias) whose lowering
    is chosen by `impl`."""

    def __init__(self, cin: int, cout: int, size: int, *, impl: str = "xla", rngs: nnx.Rngs):
        if impl not in CONV_IMPLS:
            raise ValueError(f"unknown conv impl {impl!r}; valid: {', '.join(CONV_IMPLS)}")
        self.impl = impl
        init = nnx.initializers.glorot_uniform()
        self.kernel = nnx.Param(init(rngs.params(), (size, size, cin, cout)))
        self.bias = nnx.Param(jnp.zeros((cout,)))

    def __call__(self, x: jax.Array) -> jax.Array:
        return conv2d_valid(x, self.kernel[...], self.bias[...], self.impl)
