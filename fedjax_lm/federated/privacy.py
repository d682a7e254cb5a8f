"""User-level DP-FedAvg (McMahan et al. 2018) with adaptive clipping (Andrew et al. 2021), as a
transform of any algorithm whose message is the client's model (FedAvg, FedProx, FedOpt).

    client_final   message → Δ = message − server params, clipped to L2 norm `clip` (flat, or
                   per layer: each leaf to clip/√leaves, so the whole stays within clip)
    aggregator     Σ clipped Δ over the participating clients (weight 1 each, whatever the
                   weighting) / m, the EXPECTED cohort size: a fixed denominator, so one client
                   moves the result by at most clip/m and any chunk width sums the same
    server update  + N(0, (z_Δ·clip)²)/m drawn ONCE from the round's noise key (the same on
                   every executor), back to model space, then the inner server update

Adaptive clipping: each client also reports b_i = 1[‖Δ_i‖ ≤ clip] − ½; the server forms the
noisy fraction b̄ = (Σ b_i + N(0, σ_b²))/m + ½ and sets clip ← clip·exp(−η(b̄ − q)), so the clip
follows the q-quantile of the update norms. The noise multiplier z is split between the two
sums as in the paper (and TFF): z_Δ = (z⁻² − (2σ_b)⁻²)^(−½), so that the pair is exactly as
private as one Gaussian sum with multiplier z. The clip is server state (checkpointed).
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from fedjax_lm.federated.aggregate import Aggregate, fixed_mean
from fedjax_lm.federated.algorithm import Algorithm
from fedjax_lm.federated.sampling import noise_key
from fedjax_lm.federated.state import Params, PyTree, ServerState
from fedjax_lm.federated.tree import tree_sub

COUNT_STDDEV_FRACTION = 0.05  # TFF's default σ_b: 5 % of the expected cohort


@dataclasses.dataclass(frozen=True)
class DPConfig:
    """The DP-FedAvg mechanism; `noise_multiplier` z is the total (what the accountant sees)."""

    clip: float  # the L2 bound on a client's delta (the initial one when adaptive)
    noise_multiplier: float  # z
    expected_clients: float  # m: the fixed denominator
    per_layer: bool = False
    target_quantile: float | None = None  # adaptive clipping's q; None: a fixed clip
    clip_learning_rate: float = 0.2  # η (TFF's default)
    count_stddev: float | None = None  # σ_b; None: 5 % of m

    def __post_init__(self):
        checks = (
            (self.clip > 0, f"clip must be > 0, got {self.clip}"),
            (self.noise_multiplier >= 0, f"noise_multiplier must be >= 0, got "
                                         f"{self.noise_multiplier}"),
            (self.expected_clients > 0, f"expected_clients must be > 0, got "
                                        f"{self.expected_clients}"),
            (self.target_quantile is None or 0 < self.target_quantile < 1,
             f"target_quantile must be in (0, 1), got {self.target_quantile}"),
            (not (self.adaptive and self.per_layer),
             "adaptive clipping adapts one flat clip norm; it does not combine with per_layer"),
            (self.clip_learning_rate > 0, "clip_learning_rate must be > 0"),
            (self.count_stddev is None or self.count_stddev > 0, "count_stddev must be > 0"),
        )
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        if self.adaptive and self.noise_multiplier >= self.max_noise_multiplier:
            raise ValueError(
                f"noise_multiplier {self.noise_multiplier:g} leaves no noise budget for the "
                f"clipped count (it must be < 2·σ_b = {self.max_noise_multiplier:g}); raise "
                "count_stddev or lower the noise")

    @property
    def adaptive(self) -> bool:
        return self.target_quantile is not None

    @property
    def count_noise_std(self) -> float:
        """σ_b, the clipped count's noise std (0 without adaptive clipping or noise)."""
        if not self.adaptive or self.noise_multiplier == 0:
            return 0.0
        return (self.count_stddev if self.count_stddev is not None
                else COUNT_STDDEV_FRACTION * self.expected_clients)

    @property
    def max_noise_multiplier(self) -> float:
        """The largest z the split allows: the count's own multiplier 2σ_b (inf if fixed)."""
        if not self.adaptive:
            return math.inf
        return 2 * (self.count_stddev if self.count_stddev is not None
                    else COUNT_STDDEV_FRACTION * self.expected_clients)

    @property
    def delta_noise_multiplier(self) -> float:
        """z_Δ, the delta sum's share of z (z itself with a fixed clip)."""
        z = self.noise_multiplier
        if z == 0 or not self.adaptive:
            return z
        return (z ** -2 - (2 * self.count_noise_std) ** -2) ** -0.5


class DPServerState(NamedTuple):
    inner: PyTree  # the wrapped algorithm's server state
    clip: jax.Array  # float32 scalar: this round's clip norm


class DPMessage(NamedTuple):
    delta: Params  # the clipped model delta
    below: jax.Array  # 1[‖Δ‖ ≤ clip] − ½: the adaptive clip's record


def clip_update(delta: Params, clip: jax.Array | float,
                per_layer: bool = False) -> tuple[Params, jax.Array]:
    """(Δ scaled to L2 norm ≤ clip, ‖Δ‖). Per layer: each leaf to clip/√leaves. A delta within
    its bound is returned bit for bit (scale exactly 1); an infinite clip clips nothing."""
    leaves, treedef = jax.tree.flatten(delta)
    norms = jnp.stack([jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)))) for x in leaves])
    norm = jnp.sqrt(jnp.sum(jnp.square(norms)))
    bound = jnp.asarray(clip, jnp.float32)
    if per_layer:
        bound, measured = bound / math.sqrt(len(leaves)), norms
    else:
        measured = jnp.broadcast_to(norm, norms.shape)
    scale = jnp.minimum(1.0, bound / jnp.maximum(measured, jnp.finfo(jnp.float32).tiny))
    clipped = [x * s.astype(x.dtype) for x, s in zip(leaves, scale, strict=True)]
    return jax.tree.unflatten(treedef, clipped), norm


def gaussian_like(key: jax.Array, tree: PyTree, std: jax.Array) -> PyTree:
    """N(0, std²) noise shaped like `tree` (one key per leaf, drawn in float32)."""
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, len(leaves))
    noise = [(jax.random.normal(k, x.shape, jnp.float32) * std).astype(x.dtype)
             for k, x in zip(keys, leaves, strict=True)]
    return jax.tree.unflatten(treedef, noise)


def next_clip(clip: jax.Array, below_mean: jax.Array, config: DPConfig) -> jax.Array:
    """The geometric quantile step: clip·exp(−η(b̄ − q)), b̄ = below_mean + ½ clamped to
    [0, 1] (`below_mean` is the noisy Σ b_i / m)."""
    fraction = jnp.clip(below_mean + 0.5, 0.0, 1.0)
    return clip * jnp.exp(-config.clip_learning_rate * (fraction - config.target_quantile))


def dp_fedavg(algorithm: Algorithm, config: DPConfig) -> Algorithm:
    """`algorithm` with user-level DP: clipped deltas, a fixed-denominator sum, Gaussian noise
    once per round (see the module docstring)."""
    m = config.expected_clients
    z_delta, count_std = config.delta_noise_multiplier, config.count_noise_std

    def inner(server: ServerState) -> ServerState:
        return server.replace(opt_state=server.opt_state.inner)

    def client_final(server, carry, client):
        out = algorithm.client_final(inner(server), carry, client)
        reference = algorithm.reference(inner(server))  # the trainable leaves under PEFT
        if jax.tree.structure(out.message) != jax.tree.structure(reference):
            raise ValueError(f"DP-FedAvg needs an algorithm whose message is the client's "
                             f"model; {algorithm.name!r} sends something else")
        clip = server.opt_state.clip
        delta, norm = clip_update(tree_sub(out.message, reference), clip, config.per_layer)
        below = (norm <= clip).astype(jnp.float32) - 0.5
        # Every participating client weighs 1: the sum, not an example-weighted mean.
        weight = (client.weight > 0).astype(jnp.float32)
        return out._replace(message=DPMessage(delta, below), weight=weight)

    def server_update(server, aggregate: Aggregate):
        clip = server.opt_state.clip
        delta_key, count_key = jax.random.split(noise_key(server.rng, server.round))
        mean_delta = aggregate.value.delta
        if z_delta > 0:
            noise = gaussian_like(delta_key, mean_delta, z_delta * clip / m)
            mean_delta = jax.tree.map(jnp.add, mean_delta, noise)
        if config.adaptive:
            below = aggregate.value.below
            if count_std > 0:
                below = below + jax.random.normal(count_key, (), jnp.float32) * (count_std / m)
            new_clip = next_clip(clip, below, config)
        else:
            new_clip = clip
        model = jax.tree.map(jnp.add, algorithm.reference(inner(server)), mean_delta)
        # Weight 1: even a round nobody joined moves by its noise (the fixed denominator).
        new = algorithm.server_update(inner(server), Aggregate(model, jnp.ones((), jnp.float32)))
        return new.replace(opt_state=DPServerState(new.opt_state, new_clip))

    return dataclasses.replace(
        algorithm,
        name=f"dp_{algorithm.name}",
        server_init=lambda params: DPServerState(algorithm.server_init(params),
                                                 jnp.asarray(config.clip, jnp.float32)),
        client_init=lambda server, client: algorithm.client_init(inner(server), client),
        local_step=lambda server, carry, batch, key: algorithm.local_step(inner(server), carry,
                                                                          batch, key),
        client_final=client_final,
        server_update=server_update,
        aggregator=fixed_mean(m),
    )
