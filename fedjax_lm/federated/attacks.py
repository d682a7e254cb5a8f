"""Malicious clients as transforms of the server's aggregator, on the client axis.

The malicious clients are a fixed, seeded subset of the *population* (`malicious_clients`).
An attack wraps the aggregator (`attacked`): before the (robust) rule sees the cohort's
messages, the malicious clients' messages are replaced. Living in the aggregator, and not in
the clients' hooks, lets one place hold both kinds of attack: per-client ones (vmapped over
the client axis, so a decomposable rule stays decomposable and chunks attack alone) and
cohort-level ones (ALIE needs the benign clients' statistics), and any algorithm whose
message is a model gets them. The clients' reported update norms stay their honest ones.

On the delta Δ = message − server model of a malicious client:

- `sign_flip`: −Δ;  `scale`: `scale`·Δ (model replacement with a large factor);
- `gaussian`: Δ replaced by N(0, std²) per coordinate, from the round's aggregation key and the
  client's id (the same whatever the chunking);
- `alie` ("a little is enough", Baruch et al. 2019): every malicious message becomes μ − z·σ,
  per coordinate over the live benign messages (plain mean and std), with
  z = Φ⁻¹((n − s) / n), s = ⌊n/2 + 1⌋ − f for the n live clients of which f are malicious.
  A round with no live benign client (the cohort is all malicious) takes μ and σ over the
  malicious clients' own honest messages instead, as the paper's attackers do when they
  cannot see the others: one attacker sends its honest model (σ = 0), never a zero model;
- `label_flip` poisons the malicious clients' data instead (`flip_labels`, in the runner):
  label y → K − 1 − y; their messages are then honest training on wrong labels.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lm.federated.aggregate import Aggregate, Aggregator, Context, context_args
from fedjax_lm.federated.state import PyTree

ATTACKS = ("none", "sign_flip", "scale", "gaussian", "label_flip", "alie")
MESSAGE_ATTACKS = ("sign_flip", "scale", "gaussian", "alie")  # those that wrap the aggregator
_MALICIOUS_STREAM = 17  # numpy seed stream of the malicious set: (seed, 17)


@dataclasses.dataclass(frozen=True)
class AttackConfig:
    kind: str = "none"
    scale: float = 10.0  # `scale`: the factor on Δ
    std: float = 1.0  # `gaussian`: the noise std per coordinate


def malicious_clients(num_clients: int, fraction: float, seed: int) -> np.ndarray:
    """`bool[N]`: round(fraction·N) clients drawn from (seed, 17), fixed for the run."""
    if not 0 <= fraction < 0.5:
        raise ValueError(f"malicious fraction must be in [0, 0.5), got {fraction}")
    count = int(round(fraction * num_clients))
    chosen = np.random.default_rng((seed, _MALICIOUS_STREAM)).choice(
        num_clients, count, replace=False)
    mask = np.zeros(num_clients, bool)
    mask[chosen] = True
    return mask


def flip_labels(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Label flipping: y → K − 1 − y (a fixed, seed-free permutation of the classes)."""
    return (num_classes - 1 - np.asarray(labels)).astype(np.asarray(labels).dtype)


def _rows(mask: jax.Array, x: jax.Array) -> jax.Array:
    return mask.reshape((-1,) + (1,) * (x.ndim - 1))


def corrupt(attack: AttackConfig, malicious: jax.Array, messages: PyTree,
            ctx: Context) -> PyTree:
    """The per-client attacks on a chunk `[K, ...]`: malicious rows replaced, others exact.
    Each row needs only its own message and the server model, so an all-malicious (or
    all-padding) cohort is well defined; rows with p = 0 are changed too, and every
    aggregator ignores them."""
    bad = malicious[ctx.client_ids]
    leaves, treedef = jax.tree.flatten(messages)
    refs = treedef.flatten_up_to(ctx.reference)
    out = []
    for i, (m, r) in enumerate(zip(leaves, refs, strict=True)):
        delta = m - r[None]
        if attack.kind == "sign_flip":
            new = r[None] - delta
        elif attack.kind == "scale":
            new = r[None] + attack.scale * delta
        else:  # gaussian
            keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(
                jax.random.fold_in(ctx.key, i), ctx.client_ids)
            noise = jax.vmap(lambda k, r=r: jax.random.normal(k, r.shape, jnp.float32))(keys)
            new = r[None] + (attack.std * noise).astype(m.dtype)
        out.append(jnp.where(_rows(bad, m), new, m))
    return treedef.unflatten(out)


def alie_z(n: jax.Array, f: jax.Array) -> jax.Array:
    """Baruch et al.'s z_max for n workers of which f are malicious."""
    s = jnp.floor(n / 2 + 1) - f
    return jax.scipy.special.ndtri(jnp.clip((n - s) / jnp.maximum(n, 1), 1e-6, 1 - 1e-6))


def alie(malicious: jax.Array, messages: PyTree, p: jax.Array, ctx: Context) -> PyTree:
    """ALIE on the whole cohort: malicious live rows ← μ − z·σ per coordinate.

    μ and σ (plain mean, population std) are over the live (p > 0) benign rows; when the
    round has none, over the live malicious rows' own honest messages (Baruch et al.'s
    attackers estimate the benign statistics from their own honest updates when they see no
    one else's), so a lone attacker sends its honest model. Dead rows (padding, non-finite
    clients, p = 0) are never counted nor changed; with no live row nothing changes."""
    live = p > 0
    bad = malicious[ctx.client_ids] & live
    good = live & ~bad
    basis = jnp.where(jnp.any(good), good, bad)  # whose messages give μ and σ
    n_basis = jnp.maximum(jnp.sum(basis), 1).astype(jnp.float32)
    z = alie_z(jnp.sum(live).astype(jnp.float32), jnp.sum(bad).astype(jnp.float32))

    def forge(x):
        keep = _rows(basis, x)
        xf = x.astype(jnp.float32)
        mu = jnp.sum(jnp.where(keep, xf, 0.0), axis=0) / n_basis
        sigma = jnp.sqrt(jnp.sum(jnp.where(keep, jnp.square(xf - mu), 0.0), axis=0) / n_basis)
        return jnp.where(_rows(bad, x), (mu - z * sigma).astype(x.dtype), x)

    return jax.tree.map(forge, messages)


def attacked(inner: Aggregator, attack: AttackConfig, malicious: np.ndarray) -> Aggregator:
    """`inner` fed the attacked messages. Per-client attacks keep `inner`'s chunk sums; ALIE
    needs the whole cohort. `label_flip` and `none` return `inner` (their attack is data)."""
    if attack.kind not in MESSAGE_ATTACKS:
        return inner
    mask = jnp.asarray(malicious, bool)

    def inner_args(ctx: Context) -> tuple:
        return context_args(inner, ctx)

    if attack.kind == "alie":
        def reduce(messages: PyTree, p: jax.Array, ctx: Context) -> Aggregate:
            return inner.reduce(alie(mask, messages, p, ctx), p, *inner_args(ctx))

        return Aggregator(f"{inner.name} under alie", reduce, contextual=True)

    def reduce_(messages: PyTree, p: jax.Array, ctx: Context) -> Aggregate:
        return inner.reduce(corrupt(attack, mask, messages, ctx), p, *inner_args(ctx))

    add = None
    if inner.decomposable:
        def add(partial, messages: PyTree, p: jax.Array, ctx: Context):
            return inner.add(partial, corrupt(attack, mask, messages, ctx), p, *inner_args(ctx))

    return Aggregator(f"{inner.name} under {attack.kind}", reduce_, inner.init, add,
                      inner.finalize, contextual=True)
