"""Robust aggregators: order statistics and distance-based rules over the client axis.

Every rule here ignores clients with p = 0 (padding, non-finite messages): they are never
selected, counted or sorted in. FedAvg's message is the client's final *model*; the rules
below that only compare messages with each other (median, trimmed mean, Krum, Multi-Krum,
geometric median) are translation-equivariant, so on models they give exactly the server
model plus the rule applied to the deltas. Norm bounding is not: it bounds ‖model − server‖,
so it is contextual (it sees the server params) and still decomposes into chunk sums.

Median, trimmed mean, Krum and the geometric median treat live clients alike (their
weights only say who is live), as in the papers; Multi-Krum, norm bounding and the Weiszfeld
iterations weigh clients by p. All but norm bounding need every message at once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from fedjax_lm.federated.aggregate import (
    Aggregate,
    Aggregator,
    Context,
    coordinate_median,
    weighted_mean,
)
from fedjax_lm.federated.state import PyTree

AGGREGATORS = ("mean", "median", "trimmed_mean", "norm_bound", "krum", "multi_krum",
               "geometric_median")
ALIASES = {"weighted_mean": "mean", "coordinate_median": "median"}  # the names before issue 17
WHOLE_COHORT = ("median", "trimmed_mean", "krum", "multi_krum", "geometric_median")


def _column(mask: jax.Array, x: jax.Array) -> jax.Array:
    """`mask[C]` broadcast against a `[C, ...]` leaf."""
    return mask.reshape((-1,) + (1,) * (x.ndim - 1))


def trimmed_mean(trim_fraction: float) -> Aggregator:
    """Per coordinate, drop the ⌊β·n⌋ largest and smallest of the n live values and average
    the rest (Yin et al. 2018)."""
    if not 0 <= trim_fraction < 0.5:
        raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction}")

    def reduce(messages: PyTree, p: jax.Array) -> Aggregate:
        live = p > 0
        n = jnp.sum(live)
        k = jnp.floor(trim_fraction * n).astype(n.dtype)
        rank = jnp.arange(p.shape[0])
        kept = (rank >= k) & (rank < n - k)

        def trim(x):
            xs = jnp.sort(jnp.where(_column(live, x), x, jnp.inf), axis=0)  # dead ones last
            total = jnp.sum(jnp.where(_column(kept, x), xs, 0), axis=0)
            return (total / jnp.maximum(n - 2 * k, 1)).astype(x.dtype)

        return Aggregate(jax.tree.map(trim, messages), jnp.sum(p))

    return Aggregator("trimmed_mean", reduce)


def clip_to_reference(messages: PyTree, reference: PyTree, bound: float) -> PyTree:
    """Each client's message moved so that ‖message − reference‖ ≤ bound; messages already
    within the bound are returned unchanged, bit for bit."""
    delta = jax.tree.map(lambda m, r: m - r[None], messages, reference)
    norms = jnp.sqrt(sum(jnp.sum(jnp.square(d).reshape(d.shape[0], -1), axis=1)
                         for d in jax.tree.leaves(delta)))
    inside = norms <= bound
    scale = bound / jnp.where(inside, 1.0, norms)
    return jax.tree.map(
        lambda m, r, d: jnp.where(_column(inside, m), m,
                                  r[None] + _column(scale, d).astype(d.dtype) * d),
        messages, reference, delta)


def norm_bound(bound: float) -> Aggregator:
    """Bound every client's delta to L2 norm `bound`, then the weighted mean (Sun et al.
    2019, "Can you really backdoor FL?"). Contextual and decomposable: chunks clip alone."""
    if not bound > 0:
        raise ValueError(f"norm_bound must be > 0, got {bound}")
    mean = weighted_mean()

    def add(partial, messages: PyTree, p: jax.Array, ctx: Context):
        return mean.add(partial, clip_to_reference(messages, ctx.reference, bound), p)

    def reduce(messages: PyTree, p: jax.Array, ctx: Context) -> Aggregate:
        template = jax.tree.map(lambda x: x[0], messages)
        return mean.finalize(add(mean.init(template), messages, p, ctx))

    return Aggregator("norm_bound", reduce, mean.init, add, mean.finalize, contextual=True)


def pairwise_sq_distances(messages: PyTree) -> jax.Array:
    """`[C, C]` squared L2 distances between clients' messages, from Gram matrices of the
    messages centred on their mean (centring keeps float32 exact enough for models that
    differ little)."""
    total = 0.0
    for x in jax.tree.leaves(messages):
        flat = x.reshape(x.shape[0], -1).astype(jnp.float32)
        flat = flat - jnp.mean(flat, axis=0)
        gram = flat @ flat.T
        sq = jnp.diag(gram)
        total = total + sq[:, None] + sq[None, :] - 2 * gram
    return jnp.maximum(total, 0.0)


def krum_scores(messages: PyTree, p: jax.Array, byzantine: int) -> jax.Array:
    """Krum's score per client: the sum of squared distances to its n − f − 2 closest live
    neighbours (Blanchard et al. 2017); +inf for dead clients."""
    live = p > 0
    n = jnp.sum(live)
    dist = pairwise_sq_distances(messages)
    c = p.shape[0]
    others = live[None, :] & ~jnp.eye(c, dtype=bool)
    nearest = jnp.sort(jnp.where(others, dist, jnp.inf), axis=1)
    m = jnp.maximum(n - byzantine - 2, 1)
    counted = (jnp.arange(c)[None, :] < m) & jnp.isfinite(nearest)  # a lone client scores 0
    scores = jnp.sum(jnp.where(counted, nearest, 0.0), axis=1)
    return jnp.where(live, scores, jnp.inf)


def _weighted_mean_of(messages: PyTree, weights: jax.Array) -> PyTree:
    return weighted_mean().reduce(messages, weights).value


def krum(byzantine: int) -> Aggregator:
    """The one message with the lowest Krum score, assuming at most f = `byzantine`
    malicious clients (needs n > 2f + 2 live clients)."""

    def reduce(messages: PyTree, p: jax.Array) -> Aggregate:
        chosen = jnp.argmin(krum_scores(messages, p, byzantine))
        value = jax.tree.map(lambda x: x[chosen], messages)
        return Aggregate(value, jnp.sum(p))

    return Aggregator("krum", reduce)


def multi_krum(byzantine: int, num_selected: int | None = None) -> Aggregator:
    """The p-weighted mean of the m messages with the lowest Krum scores; m defaults to
    n − f (the live clients less the assumed malicious ones), as in Blanchard et al.'s
    experiments."""

    def reduce(messages: PyTree, p: jax.Array) -> Aggregate:
        scores = krum_scores(messages, p, byzantine)
        n = jnp.sum(p > 0)
        m = jnp.maximum(n - byzantine, 1) if num_selected is None else num_selected
        rank = jnp.argsort(jnp.argsort(scores))  # 0 = best; ties broken by client order
        selected = (rank < m) & (p > 0)
        return Aggregate(_weighted_mean_of(messages, jnp.where(selected, p, 0.0)), jnp.sum(p))

    return Aggregator("multi_krum", reduce)


def distances_to(messages: PyTree, point: PyTree) -> jax.Array:
    """`[C]` L2 distances from each client's message to one point."""
    sq = sum(jnp.sum(jnp.square(x - z[None]).reshape(x.shape[0], -1), axis=1)
             for x, z in zip(jax.tree.leaves(messages), jax.tree.leaves(point), strict=True))
    return jnp.sqrt(sq)


def geometric_median(iterations: int = 10, nu: float = 1e-6) -> Aggregator:
    """argmin_z Σ p_i ‖x_i − z‖ by the smoothed Weiszfeld iterations of RFA (Pillutla et al.
    2022): z ← Σ β_i x_i / Σ β_i with β_i = p_i / max(ν, ‖x_i − z‖), from the weighted mean,
    a fixed number of times (one compiled program)."""
    if iterations < 1 or not nu > 0:
        raise ValueError(f"geometric_median needs iterations >= 1 and nu > 0, got "
                         f"{iterations}, {nu}")

    def reduce(messages: PyTree, p: jax.Array) -> Aggregate:
        def step(_, z):
            beta = p / jnp.maximum(nu, distances_to(messages, z))
            return _weighted_mean_of(messages, beta)

        start = _weighted_mean_of(messages, p)
        return Aggregate(jax.lax.fori_loop(0, iterations, step, start), jnp.sum(p))

    return Aggregator("geometric_median", reduce)


@dataclasses.dataclass(frozen=True)
class RobustConfig:
    """The aggregator's name and parameters (validated by the runner's config)."""

    name: str = "mean"
    trim_fraction: float = 0.1
    norm_bound: float | None = None
    byzantine: int = 0
    multi_krum_m: int | None = None
    gm_iterations: int = 10
    gm_nu: float = 1e-6


BUILDERS: dict[str, Callable[[RobustConfig], Aggregator]] = {
    "mean": lambda c: weighted_mean(),
    "median": lambda c: coordinate_median(),
    "trimmed_mean": lambda c: trimmed_mean(c.trim_fraction),
    "norm_bound": lambda c: norm_bound(c.norm_bound if c.norm_bound is not None else 0.0),
    "krum": lambda c: krum(c.byzantine),
    "multi_krum": lambda c: multi_krum(c.byzantine, c.multi_krum_m),
    "geometric_median": lambda c: geometric_median(c.gm_iterations, c.gm_nu),
}


def make_aggregator(config: RobustConfig) -> Aggregator:
    """The aggregator a config names (old names accepted as aliases)."""
    name = ALIASES.get(config.name, config.name)
    if name not in BUILDERS:
        raise ValueError(f"unknown aggregator {config.name!r}; choose one of "
                         f"{', '.join(AGGREGATORS)}")
    return BUILDERS[name](config)
