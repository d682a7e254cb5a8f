"""Max pooling as a max over strided slices, not XLA's `reduce_window`.

Why: the gradient of `reduce_window` max is `select_and_scatter`, which XLA:CPU runs slowly;
under the engine's vmap over clients it was half of a CNN client's step (pfl-research's CNN: a
2-client step 56 -> 29 ms; LeNet vmapped over 20 clients 98 -> 58 ms). Here a pooled output is
the elementwise max of the window's kh·kw strided views of the input, whose gradient is plain
comparisons and adds. Forward values equal `nnx.max_pool`'s exactly; gradients too, except at
exact ties inside a window, where this splits the gradient among the tied inputs instead of
sending it all to one (a measure-zero event for real-valued activations; after a ReLU a window
of zeros has zero gradient either way).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

PADDINGS = ("VALID", "SAME")


def max_pool(x: jax.Array, window: int, stride: int, padding: str = "VALID") -> jax.Array:
    """Max pool of NHWC `x` over `window` x `window` windows every `stride` pixels; 'SAME'
    pads with -inf as TensorFlow does (the extra row/column after, when uneven)."""
    if padding not in PADDINGS:
        raise ValueError(f"unknown padding {padding!r}; valid: {', '.join(PADDINGS)}")
    h, w = x.shape[1], x.shape[2]
    if padding == "SAME":
        oh, ow = -(-h // stride), -(-w // stride)
        ph = max((oh - 1) * stride + window - h, 0)
        pw = max((ow - 1) * stride + window - w, 0)
        x = jnp.pad(x, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)),
                    constant_values=-jnp.inf)
    else:
        oh, ow = (h - window) // stride + 1, (w - window) // stride + 1
    if window == stride and padding == "VALID":  # non-overlapping: one reshape, one reduce
        x = x[:, :oh * stride, :ow * stride]
        return x.reshape(x.shape[0], oh, window, ow, window, x.shape[3]).max(axis=(2, 4))
    span_h, span_w = (oh - 1) * stride + 1, (ow - 1) * stride + 1
    views = [x[:, i:i + span_h:stride, j:j + span_w:stride]
             for i in range(window) for j in range(window)]
    out = views[0]
    for v in views[1:]:
        out = jnp.maximum(out, v)
    return out
