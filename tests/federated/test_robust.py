"""Robust aggregators against numpy / scipy references, with zero-weight clients that must
never count; Krum and Multi-Krum on a hand-built cohort; norm bounding exactly; the same
numbers on the vmap, loop and mesh executors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats

from fedjax_lm import federated as fl
from fedjax_lm.federated.aggregate import Context
from tests.federated import toy

C = 9
DEAD = (2, 7)  # zero-weight clients: padding / non-finite; their values are wild on purpose


def cohort(seed=0):
    rs = np.random.RandomState(seed)
    messages = {"a": rs.randn(C, 3, 4).astype(np.float32), "b": rs.randn(C, 5).astype(np.float32)}
    for d in DEAD:
        messages["a"][d] = 1e4
        messages["b"][d] = -1e4
    p = rs.uniform(0.5, 2.0, C).astype(np.float32)
    p[list(DEAD)] = 0
    return messages, p / p.sum()


def live(x, p):
    return np.asarray(x)[p > 0]


def reduce(aggregator, messages, p, ctx=None):
    args = () if ctx is None else (ctx,)
    return jax.jit(aggregator.reduce)(jax.tree.map(jnp.asarray, messages), jnp.asarray(p), *args)


def test_median_and_trimmed_mean_match_numpy_and_scipy():
    messages, p = cohort()
    median = reduce(fl.coordinate_median(), messages, p)
    for beta in (0.0, 0.2, 0.3):  # 7 live clients: trims 0, 1, 2 per end
        trimmed = reduce(fl.trimmed_mean(beta), messages, p)
        for k, x in messages.items():
            np.testing.assert_allclose(trimmed.value[k], stats.trim_mean(live(x, p), beta),
                                       rtol=1e-5, atol=1e-6)
    for k, x in messages.items():
        np.testing.assert_allclose(median.value[k], np.median(live(x, p), axis=0), rtol=1e-6)
    assert float(median.weight) == pytest.approx(1.0)


def numpy_weiszfeld(points, w, iterations, nu):
    z = np.average(points, axis=0, weights=w)
    for _ in range(iterations):
        beta = w / np.maximum(nu, np.linalg.norm(points - z, axis=1))
        z = np.average(points, axis=0, weights=beta)
    return z


def flat(tree, rows=True):
    leaves = [np.asarray(tree[k]) for k in sorted(tree)]
    if rows:
        return np.concatenate([x.reshape(x.shape[0], -1) for x in leaves], axis=1)
    return np.concatenate([x.ravel() for x in leaves])


def test_geometric_median_matches_numpy_weiszfeld_and_minimises_the_distance_sum():
    messages, p = cohort(1)
    points, w = live(flat(messages), p), p[p > 0]
    got = flat(reduce(fl.geometric_median(10, 1e-6), messages, p).value, rows=False)
    np.testing.assert_allclose(got, numpy_weiszfeld(points, w, 10, 1e-6), rtol=1e-4, atol=1e-5)

    best = flat(reduce(fl.geometric_median(200, 1e-8), messages, p).value, rows=False)

    def cost(z):
        return float(np.sum(w * np.linalg.norm(points - z, axis=1)))

    rs = np.random.RandomState(0)
    for scale in (1e-1, 1e-2, 1e-3):
        for _ in range(20):
            assert cost(best) <= cost(best + scale * rs.randn(best.size)) + 1e-6
    assert cost(best) < cost(np.average(points, axis=0, weights=w))  # not just the mean


# Krum: benign clients on a line, one attacker far out, one dead client that would win.
LINE = np.array([0.0, 0.1, -0.15, 0.3, -0.35, 10.0, 0.05], np.float32)
LINE_P = np.array([1, 1, 1, 1, 1, 1, 0], np.float32) / 6


def line_messages():
    x = np.zeros((len(LINE), 2, 2), np.float32)
    x[:, 0, 0] = LINE
    return {"w": x}


def brute_force_krum_scores(points, f):
    n = len(points)
    d = (points[:, None] - points[None]) ** 2
    return np.array([np.sort(np.delete(d[i], i))[: n - f - 2].sum() for i in range(n)])


def test_krum_selects_the_expected_client():
    # Hand computed (f = 1, n = 6 live, 3 nearest): client 1 (at 0.1) scores .01+.04+.0625 =
    # .1125, client 0 .1225, client 2 .125; the attacker and the dead client never win.
    scores = brute_force_krum_scores(LINE[:6], 1)
    assert np.argmin(scores) == 1 and scores[1] == pytest.approx(0.1125)
    out = reduce(fl.krum(1), line_messages(), LINE_P)
    np.testing.assert_array_equal(out.value["w"], line_messages()["w"][1])
    np.testing.assert_allclose(fl.robust.krum_scores(line_messages(), LINE_P, 1)[:6], scores,
                               rtol=1e-5)


@pytest.mark.parametrize("m, chosen", [(None, [0, 1, 2, 3, 4]), (2, [1, 0])])
def test_multi_krum_averages_the_expected_set(m, chosen):
    p = LINE_P.copy()
    p[:6] = [0.1, 0.2, 0.1, 0.3, 0.2, 0.1]
    out = reduce(fl.multi_krum(1, m), line_messages(), p)
    want = np.average(line_messages()["w"][chosen], axis=0, weights=p[chosen])
    np.testing.assert_allclose(out.value["w"], want, rtol=1e-6)


def test_norm_bound_keeps_small_updates_and_scales_large_ones_exactly():
    rs = np.random.RandomState(0)
    ref = {"a": rs.randn(3, 4).astype(np.float32), "b": rs.randn(5).astype(np.float32)}
    norms = np.array([0.5, 3.0, 1.0, 10.0, 0.25], np.float32)
    directions = [{k: rs.randn(*v.shape).astype(np.float32) for k, v in ref.items()}
                  for _ in norms]
    deltas = [{k: d[k] * n / np.linalg.norm(flat(d, rows=False)) for k in d}
              for d, n in zip(directions, norms, strict=True)]
    messages = {k: np.stack([ref[k] + d[k] for d in deltas]) for k in ref}
    p = np.array([0.2, 0.2, 0.2, 0.4, 0.0], np.float32)  # the last client is dead
    ctx = Context(jax.tree.map(jnp.asarray, ref), jnp.arange(5), jax.random.key(0))
    bounded = jax.jit(fl.robust.clip_to_reference, static_argnums=2)(messages, ctx.reference,
                                                                       1.0)
    for i, n in enumerate(norms):
        got = {k: np.asarray(bounded[k][i]) for k in ref}
        if n <= 1.0:  # unchanged, bit for bit
            for k in ref:
                np.testing.assert_array_equal(got[k], messages[k][i])
        else:
            delta = flat({k: got[k] - ref[k] for k in ref}, rows=False)
            assert np.linalg.norm(delta) == pytest.approx(1.0, rel=1e-5)
            np.testing.assert_allclose(delta, flat(deltas[i], rows=False) / n, rtol=1e-4,
                                       atol=1e-6)
    agg = fl.norm_bound(1.0)
    out = reduce(agg, messages, p, ctx)
    for k in ref:
        want = np.tensordot(p, np.asarray(bounded[k]), axes=1) / p.sum()
        np.testing.assert_allclose(out.value[k], want, rtol=1e-5, atol=1e-6)
    # ... and it decomposes: two chunks of chunk sums give the same mean.
    parts = agg.init(jax.tree.map(lambda x: jnp.zeros(x.shape[1:]), messages))
    add = jax.jit(agg.add)
    for lo, hi in ((0, 2), (2, 5)):
        sub = Context(ctx.reference, ctx.client_ids[lo:hi], ctx.key)
        parts = add(parts, jax.tree.map(lambda x, lo=lo, hi=hi: x[lo:hi], messages),
                        p[lo:hi], sub)
    for k in ref:
        np.testing.assert_allclose(agg.finalize(parts).value[k], out.value[k], rtol=1e-6)


def test_names_aliases_and_the_chunking_refusal():
    make = fl.make_aggregator
    assert make(fl.RobustConfig("weighted_mean")).name == "mean"
    assert make(fl.RobustConfig("coordinate_median")).name == "median"
    for name in fl.AGGREGATORS:
        agg = make(fl.RobustConfig(name, norm_bound=1.0))
        assert agg.decomposable == (name not in fl.WHOLE_COHORT), name
    with pytest.raises(fl.UnsupportedError, match=r"^aggregator 'krum' needs every client's "
                       r"message at once and cannot run in chunks \(clients_per_chunk=2\); "
                       r"unset clients_per_chunk or use backend vmap/mesh/loop$"):
        fl.ExecutorConfig(clients_per_chunk=2).check_aggregator(fl.krum(1))


@pytest.mark.parametrize("aggregator", [fl.geometric_median(5), fl.trimmed_mean(0.2)],
                         ids=["geometric_median", "trimmed_mean"])
def test_whole_cohort_aggregators_agree_on_vmap_loop_and_mesh(aggregator):
    data = toy.client_data(8)
    data["x"][3] *= 50.0  # an outlier the rules resist
    algorithm = fl.fedavg(toy.loss_fn, optax.sgd(0.1), aggregator=aggregator)
    params = toy.init_params()
    results = {}
    for backend in ("vmap", "loop", "mesh"):
        engine = fl.FederatedEngine(algorithm, fl.ExecutorConfig(backend=backend))
        state = engine.init(params, jax.random.key(0))
        for _ in range(2):
            state = engine.run_round(state, data, client_ids=np.arange(8) + 3).state
        results[backend] = state.params
    assert toy.max_abs_diff(results["vmap"], results["loop"]) <= 1e-5
    assert toy.max_abs_diff(results["vmap"], results["mesh"]) <= 1e-5
    assert toy.max_abs_diff(results["vmap"], params) > 1e-3  # it trained
