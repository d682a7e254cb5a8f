"""A 2-D convolution layer with two lowerings of the same function: XLA's convolution, or
patches (im2col) times a matrix.

Why two: the engine vmaps a client's step over the cohort, so every client's conv has its own
kernel. JAX batches a conv whose kernel is batched into one grouped convolution
(`feature_group_count` = clients), which XLA:CPU runs far slower than the same work as a batched
matmul (`benchmarks/results/conv-in-loops/conv_clients.md`: 6.8x for pfl-research's CNN; one
client at a time, XLA's conv is within 1.2x of patches × matrix). With `impl="patches"` the window
extraction has no parameters (under vmap the client axis folds into the batch) and the
per-client part is a batched `dot_general`. Both give the same numbers (to float rounding);
the parameters (`kernel` [kh, kw, in, out], `bias` [out]) are the same either way.

`impl="xla"` differentiates through a custom VJP whose two gradient convolutions are written in
the canonical NHWC x HWIO form (operands transposed first). Autodiff's own transposed
convolutions (`dim_labels` like `f01b_i01o->01bf`) are canonicalised by XLA:CPU only in the
entry computation: inside a `while` body, i.e. any `lax.scan` over local steps, they run as
naive loops, the weight gradient ~50x slower than outside (`benchmarks/conv_in_loops.py`). The
numbers are the same (the canonical form is what XLA rewrites to anyway; tested bitwise).
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


_DIMS = ("NHWC", "HWIO", "NHWC")


def _conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), "VALID", dimension_numbers=_DIMS)


@jax.custom_vjp
def xla_conv_valid(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """XLA's stride-1 'VALID' convolution (no bias) whose gradients are canonical convolutions
    (module docstring: fast inside loops too). Reverse mode only, as any custom VJP: `jax.jvp`
    through it raises; use `impl="patches"` for forward-mode derivatives."""
    return _conv(x, kernel)


def _xla_conv_fwd(x: jax.Array, kernel: jax.Array):
    return _conv(x, kernel), (x, kernel)


def _xla_conv_bwd(res, dy: jax.Array):
    x, kernel = res
    kh, kw = kernel.shape[:2]
    # dx: the full correlation of dy with the kernel flipped in space, in and out swapped.
    dy_full = jnp.pad(dy, ((0, 0), (kh - 1, kh - 1), (kw - 1, kw - 1), (0, 0)))
    dx = _conv(dy_full, kernel[::-1, ::-1].transpose(0, 1, 3, 2))
    # dkernel[i, j, c, o] = sum over n, h, w of x[n, h+i, w+j, c] dy[n, h, w, o]: channels as
    # the batch, the examples as the contracted features.
    dk = _conv(x.transpose(3, 1, 2, 0), dy.transpose(1, 2, 0, 3)).transpose(1, 2, 0, 3)
    return dx, dk


xla_conv_valid.defvjp(_xla_conv_fwd, _xla_conv_bwd)


def conv2d_valid(x: jax.Array, kernel: jax.Array, bias: jax.Array, impl: str = "xla"
                 ) -> jax.Array:
    """Stride-1 'VALID' convolution of NHWC `x` with an HWIO `kernel`, plus `bias`."""
    if impl == "xla":
        y = xla_conv_valid(x, kernel)
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
