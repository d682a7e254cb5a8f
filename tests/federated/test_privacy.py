"""DP-FedAvg as a hooks transform: clipping, the noise's size and its independence from the
executor, the z = 0 / infinite-clip limit, adaptive clipping against numpy, Poisson sampling."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_lm import federated as fl
from tests.federated import toy


def _tree(seed, scale):
    rs = np.random.RandomState(seed)
    return {"a": jnp.asarray(rs.randn(7, 3) * scale, jnp.float32),
            "b": jnp.asarray(rs.randn(5) * scale, jnp.float32)}


def _norm(tree):
    return math.sqrt(sum(float(np.sum(np.square(np.asarray(x, np.float64))))
                         for x in jax.tree.leaves(tree)))


def test_clip_bounds_the_norm_and_leaves_small_updates_bitwise():
    for seed in range(5):
        big, small = _tree(seed, 3.0), _tree(seed, 0.01)
        clipped, norm = fl.clip_update(big, 1.5)
        assert norm == pytest.approx(_norm(big), rel=1e-6)
        assert _norm(clipped) <= 1.5 * (1 + 1e-6)
        np.testing.assert_allclose(clipped["a"], np.asarray(big["a"]) * 1.5 / _norm(big),
                                   rtol=1e-5)
        same, _ = fl.clip_update(small, 1.5)
        assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(same),
                                                        jax.tree.leaves(small), strict=True))
        # Per layer: each of the 2 leaves within 1.5/sqrt(2), so the whole within 1.5.
        per_layer, _ = fl.clip_update(big, 1.5, per_layer=True)
        for leaf, orig in zip(jax.tree.leaves(per_layer), jax.tree.leaves(big), strict=True):
            bound = 1.5 / math.sqrt(2)
            expected = np.asarray(orig) * min(1.0, bound / _norm(orig))
            np.testing.assert_allclose(leaf, expected, rtol=1e-5)
        unclipped, _ = fl.clip_update(big, math.inf)
        assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(unclipped),
                                                        jax.tree.leaves(big), strict=True))


def _engine(dp: fl.DPConfig | None, lr=0.2, loss_fn=toy.loss_fn, **executor):
    algorithm = fl.fedavg(loss_fn, optax.sgd(lr))
    if dp is not None:
        algorithm = fl.dp_fedavg(algorithm, dp)
    return fl.FederatedEngine(algorithm, fl.ExecutorConfig(**executor), weighting="uniform")


def _run(engine, rounds=3, clients=6, params=None, ragged=True):
    state = engine.init(toy.init_params() if params is None else params, jax.random.key(3))
    for r in range(rounds):
        state, _, _ = engine.run_round(state, toy.client_data(clients, seed=r, ragged=ragged),
                                       client_ids=np.arange(clients) + 10)
    return state


def test_zero_noise_infinite_clip_is_fedavg_to_float_tolerance():
    """Not bitwise: DP forms x + Σ(y_i − x)/m, FedAvg Σ y_i/m (another summation order).
    Every client has data, so all 6 take part, as the denominator expects."""
    plain = _run(_engine(None), ragged=False)
    dp = _run(_engine(fl.DPConfig(clip=math.inf, noise_multiplier=0.0, expected_clients=6)),
              ragged=False)
    assert toy.max_abs_diff(plain.params, dp.params) < 1e-6
    assert toy.max_abs_diff(plain.params, toy.init_params()) > 0.05  # it did train


def _frozen_loss(params, batch, rng):
    """Any loss: with learning rate 0 every client's delta is exactly 0."""
    return jnp.sum(params["w"]) * jnp.sum(batch["mask"]) * 0.0, {}


def test_noise_std_on_a_zero_update_round_is_z_clip_over_expected_cohort():
    z, clip, m = 1.3, 0.7, 8.0  # 6 clients take part; the denominator is the expected 8
    engine = _engine(fl.DPConfig(clip=clip, noise_multiplier=z, expected_clients=m), lr=0.0,
                     loss_fn=_frozen_loss)
    params = {"w": jnp.zeros((400, 500), jnp.float32)}
    state = _run(engine, rounds=1, params=params)
    noise = np.asarray(state.params["w"], np.float64).ravel()
    n = noise.size  # 200,000 draws: the sample std's relative s.e. is 1/sqrt(2n) = 0.16 %
    expected = z * clip / m
    assert abs(noise.std() / expected - 1) < 5 / math.sqrt(2 * n)
    assert abs(noise.mean()) < 5 * expected / math.sqrt(n)


SLOW = pytest.mark.slow


@pytest.mark.parametrize("executor", [
    {"backend": "vmap", "clients_per_chunk": 2},
    {"backend": "mesh", "num_devices": 4},
    pytest.param({"backend": "loop"}, marks=SLOW),
    pytest.param({"backend": "vmap", "clients_per_chunk": 4, "chunk_executor": "host"},
                 marks=SLOW),
    pytest.param({"backend": "pmap", "num_devices": 2}, marks=SLOW),
])
def test_noise_and_clipping_are_the_same_on_every_executor(executor):
    dp = fl.DPConfig(clip=0.3, noise_multiplier=1.0, expected_clients=5.0)
    ref = _run(_engine(dp, backend="vmap"), rounds=2)
    other = _run(_engine(dp, **executor), rounds=2)
    # Same noise: a different draw would differ by ~0.3·1/5 per coordinate.
    assert toy.max_abs_diff(ref.params, other.params) < 1e-6
    assert toy.max_abs_diff(ref.params, _run(_engine(None), rounds=2).params) > 0.01  # noisy


def _norm_loss(params, batch, rng):
    """Linear in w: one SGD step at lr 1 moves w by exactly −g, the client's own vector."""
    g = jnp.sum(batch["g"] * batch["mask"][..., None], axis=(0,)) / jnp.maximum(
        jnp.sum(batch["mask"]), 1.0)
    return jnp.sum(params["w"] * g), {}


def test_adaptive_clip_matches_numpy_and_tracks_the_quantile():
    norms = np.arange(1.0, 11.0)  # client i's update has norm i + 1
    rs = np.random.RandomState(0)
    directions = rs.randn(10, 4)
    g = directions / np.linalg.norm(directions, axis=1, keepdims=True) * norms[:, None]
    data = {"g": np.repeat(g[:, None, None, :], 1, axis=1).astype(np.float32),
            "mask": np.ones((10, 1, 1), np.float32)}
    q, lr, clip0 = 0.3, 0.2, 0.5
    dp = fl.DPConfig(clip=clip0, noise_multiplier=0.0, expected_clients=10, target_quantile=q,
                     clip_learning_rate=lr)
    engine = _engine(dp, lr=1.0, loss_fn=_norm_loss)
    state = engine.init({"w": jnp.zeros((4,), jnp.float32)}, jax.random.key(0))
    # numpy: Andrew et al. 2021 Algorithm 1 with geometric updates, noise-free.
    w, clip, clips = np.zeros(4), clip0, []
    for _ in range(100):
        deltas = -g * np.minimum(1.0, clip / norms)[:, None]
        fraction = np.mean(norms <= clip)
        w = w + deltas.sum(0) / 10
        clip = clip * math.exp(-lr * (fraction - q))
        clips.append(clip)
        state, _, _ = engine.run_round(state, data)
        np.testing.assert_allclose(float(state.opt_state.clip), clip, rtol=1e-5)
    np.testing.assert_allclose(state.params["w"], w, rtol=1e-4, atol=1e-5)
    # It climbed from 0.5 to the 30 % quantile of the norms (3 clients at or below 3, 4 at 4)
    # and oscillates there.
    assert min(clips[-30:]) > 2.5 and max(clips[-30:]) < 4.5


def test_noise_split_between_count_and_sum():
    dp = fl.DPConfig(clip=1.0, noise_multiplier=1.0, expected_clients=100, target_quantile=0.5)
    assert dp.count_noise_std == 5.0  # TFF's default: 5 % of the expected cohort
    # 1/z² = 1/z_Δ² + 1/(2σ_b)²: the two Gaussian sums are as private as one at z.
    assert dp.delta_noise_multiplier ** -2 + (2 * 5.0) ** -2 == pytest.approx(1.0)
    with pytest.raises(ValueError, match="leaves no noise budget for the clipped count"):
        fl.DPConfig(clip=1.0, noise_multiplier=10.0, expected_clients=100, target_quantile=0.5)


def test_poisson_sampling_rate_truncation_and_padding():
    n, rate, rounds = 1000, 0.05, 200
    key = jax.random.key(7)
    counts = np.zeros(n)
    for r in range(rounds):
        ids, dropped = fl.poisson_clients(fl.sampling_key(key, r), n, rate, n)
        assert dropped == 0 and np.all(np.diff(ids) > 0)
        counts[ids] += 1
        padded = fl.pad_cohort(ids, n, 90)
        assert padded.shape == (90,) and len(set(padded.tolist())) == 90
        assert np.array_equal(padded[: len(ids)], ids)
    se = math.sqrt(rate * (1 - rate) / (n * rounds))
    assert abs(counts.mean() / rounds - rate) < 4 * se
    ids, dropped = fl.poisson_clients(fl.sampling_key(key, 0), n, 0.5, 100)
    assert len(ids) == 100 and dropped > 350  # ~500 joined, 100 kept at random
    again = fl.poisson_clients(fl.sampling_key(key, 0), n, 0.5, 100)
    assert np.array_equal(ids, again[0])  # deterministic in the key
