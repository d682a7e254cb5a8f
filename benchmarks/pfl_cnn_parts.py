"""Where a client step of pfl-research's CIFAR CNN spends its time on this backend: each
layer's forward and gradients timed alone (one client, batch 10, jitted) with its GFLOP/s,
against a square f32 / bf16 matmul's rate. Usage: python benchmarks/pfl_cnn_parts.py
(benchmarks/results/pfl-cifar10-idle-s11/README.md reads its output)."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from fedjax_lm.models.cnn import image_classification_loss, make_cnn_model
from fedjax_lm.models.conv import conv2d_valid
from fedjax_lm.models.pool import max_pool


def timed(tag: str, f, *args, flop: float | None = None, reps: int = 50) -> None:
    f = jax.jit(f)
    jax.block_until_ready(f(*args))
    t = time.perf_counter()
    for _ in range(reps):
        jax.block_until_ready(f(*args))
    s = (time.perf_counter() - t) / reps
    rate = f"{flop / s / 1e9:6.0f} GFLOP/s" if flop else ""
    print(f"| {tag} | {s * 1e3:.2f} | {rate} |", flush=True)


def main() -> None:
    print("| piece | ms | rate |\n|---|---|---|")
    for dtype in (jnp.float32, jnp.bfloat16):
        a = jnp.ones((2048, 2048), dtype)
        timed(f"square matmul 2048² {jnp.dtype(dtype).name}", jnp.matmul, a, a,
              flop=2 * 2048**3, reps=10)
    k = jax.random.split(jax.random.key(0), 8)
    b = 10
    x0 = jax.random.normal(k[0], (b, 32, 32, 3))
    k1, b1 = jax.random.normal(k[1], (3, 3, 3, 32)), jnp.zeros(32)
    x1 = jax.random.normal(k[2], (b, 30, 30, 32))
    k2, b2 = jax.random.normal(k[3], (3, 3, 32, 64)), jnp.zeros(64)
    conv2 = b * 28 * 28 * 288 * 64 * 2  # one of forward, weight gradient, input gradient
    conv1 = b * 30 * 30 * 27 * 32 * 2
    for impl in ("patches", "xla"):
        timed(f"conv2 forward + both gradients ({impl})",
              jax.grad(lambda x, w, c, i=impl: (conv2d_valid(x, w, c, i) ** 2).sum(),
                       argnums=(0, 1, 2)), x1, k2, b2, flop=3 * conv2)
    timed("conv1 forward + weight gradient (patches)",
          jax.grad(lambda w, c: (conv2d_valid(x0, w, c, "patches") ** 2).sum(), argnums=(0, 1)),
          k1, b1, flop=2 * conv1)
    pooled = jax.random.normal(k[4], (b, 28, 28, 64))
    timed("2x2 max pool forward + gradient", jax.grad(lambda y: (max_pool(y, 2, 2) ** 2).sum()),
          pooled)
    h, w1 = jax.random.normal(k[5], (b, 12544)), jax.random.normal(k[6], (12544, 128))
    timed("fc1 forward + both gradients", jax.grad(lambda h, w: ((h @ w) ** 2).sum(),
                                                   argnums=(0, 1)), h, w1,
          flop=3 * b * 12544 * 128 * 2)
    model = make_cnn_model("pfl_cnn", 10)
    loss = image_classification_loss(model)
    params = model.init(jax.random.key(1))
    batch = {"image": x0, "label": jnp.zeros((b,), jnp.int32)}
    step_flop = 3 * conv2 + 2 * conv1 + 3 * b * 12544 * 128 * 2
    timed("whole client step (forward + gradients)",
          jax.grad(lambda p, bt, r: loss(p, bt, r)[0]), params, batch, jax.random.key(2),
          flop=step_flop)


if __name__ == "__main__":
    main()
