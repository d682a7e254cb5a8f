"""A tiny softmax-regression problem: fast enough to run every backend in CI."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

DIM, CLASSES = 5, 3


def loss_fn(params, batch, rng):
    """Masked mean cross-entropy, with a little dropout so the PRNG path is exercised."""
    keep = jax.random.bernoulli(rng, 0.9, batch["x"].shape)
    x = jnp.where(keep, batch["x"] / 0.9, 0.0)
    logits = x @ params["w"] + params["b"]
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
    mask = batch["mask"]
    return jnp.sum(losses * mask) / jnp.maximum(jnp.sum(mask), 1.0), {}


def init_params(seed: int = 0):
    rs = np.random.RandomState(seed)
    return {
        "w": jnp.asarray(rs.randn(DIM, CLASSES).astype(np.float32) * 0.1),
        "b": jnp.zeros((CLASSES,), jnp.float32),
    }


def client_data(num_clients: int, steps: int = 3, batch: int = 4, seed: int = 0, ragged=True):
    """[C, S, B, ...] data; with `ragged`, some clients have padded examples and steps."""
    rs = np.random.RandomState(seed)
    data = {
        "x": rs.randn(num_clients, steps, batch, DIM).astype(np.float32),
        "y": rs.randint(0, CLASSES, (num_clients, steps, batch)).astype(np.int32),
        "mask": np.ones((num_clients, steps, batch), np.float32),
    }
    if ragged:
        for c in range(1, num_clients, 2):
            data["mask"][c, steps - 1 - (c % steps) :] = 0  # whole padded steps
            data["mask"][c, 0, (c % batch) + 1 :] = 0  # a partly padded batch
    return data


def max_abs_diff(a, b) -> float:
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in pairs)
