"""Algorithms as hooks: SCAFFOLD against numpy, stateful clients on every executor, a
whole-cohort aggregator, the round as a pure program, and the executors' refusals."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_lm import federated as fl
from tests.federated import toy

D = 3


def squared_loss(params, batch, rng):
    """Masked mean squared error of a linear model (no randomness: numpy can replay it)."""
    err = batch["x"] @ params["w"] + params["b"] - batch["y"]
    mask = batch["mask"]
    return jnp.sum(mask * err**2) / jnp.maximum(jnp.sum(mask), 1.0), {}


def regression_data(num_clients, steps=3, batch=4, seed=0):
    rs = np.random.RandomState(seed)
    data = {
        "x": rs.randn(num_clients, steps, batch, D).astype(np.float32),
        "y": (rs.randn(num_clients, steps, batch) + np.arange(num_clients)[:, None, None]
              ).astype(np.float32),  # every client has its own optimum: heterogeneous
        "mask": np.ones((num_clients, steps, batch), np.float32),
    }
    data["mask"][1, 2] = 0  # client 1: two real steps
    data["mask"][2, 0, 2:] = 0  # client 2: a partly padded batch
    return data


def scaffold_numpy(data, cohorts, lr, x0, num_clients):
    """Karimireddy et al. 2020, Algorithm 1 with option II, uniform means, in numpy."""
    w, b = x0["w"].astype(np.float64), float(x0["b"])
    c = {"w": np.zeros(D), "b": 0.0}
    ci = [{"w": np.zeros(D), "b": 0.0} for _ in range(num_clients)]
    for ids in cohorts:
        ys, dcs = [], []
        for i in ids:
            yw, yb, k = w.copy(), b, 0
            for t in range(data["mask"].shape[1]):
                x, y, m = data["x"][i, t], data["y"][i, t], data["mask"][i, t]
                if m.sum() == 0:
                    continue
                err = x @ yw + yb - y
                gw = 2 * (m * err) @ x / m.sum()
                gb = 2 * (m * err).sum() / m.sum()
                yw = yw - lr * (gw - ci[i]["w"] + c["w"])
                yb = yb - lr * (gb - ci[i]["b"] + c["b"])
                k += 1
            new = {"w": ci[i]["w"] - c["w"] + (w - yw) / (k * lr),
                   "b": ci[i]["b"] - c["b"] + (b - yb) / (k * lr)}
            dcs.append({key: new[key] - ci[i][key] for key in new})
            ci[i] = new
            ys.append((yw, yb))
        w = np.mean([y[0] for y in ys], axis=0)
        b = float(np.mean([y[1] for y in ys]))
        frac = len(ids) / num_clients
        c = {key: c[key] + frac * np.mean([dc[key] for dc in dcs], axis=0) for key in c}
    return {"w": w, "b": b}, ci


def run_scaffold(data, cohorts, lr, x0, num_clients, **executor):
    algorithm = fl.scaffold(squared_loss, lr, cohort_fraction=len(cohorts[0]) / num_clients)
    engine = fl.FederatedEngine(algorithm, fl.ExecutorConfig(**executor), weighting="uniform")
    state = engine.init(x0, jax.random.key(0))
    store = engine.new_store(x0, num_clients)
    for ids in cohorts:
        cohort = {k: v[ids] for k, v in data.items()}
        state = engine.run_round_with_store(state, store, cohort, ids).state
    return state, store


COHORTS = [np.array([0, 1, 2]), np.array([1, 2, 3]), np.array([0, 2, 3])]


def test_scaffold_matches_numpy_reference_with_partial_participation():
    data = regression_data(4)
    x0 = {"w": np.full(D, 0.1, np.float32), "b": np.float32(0.0)}
    want, want_ci = scaffold_numpy(data, COHORTS, 0.05, x0, 4)
    state, store = run_scaffold(data, COHORTS, 0.05, x0, 4)
    np.testing.assert_allclose(state.params["w"], want["w"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state.params["b"], want["b"], rtol=1e-5, atol=1e-6)
    for i in range(4):  # every client's control variate, gathered and written back
        np.testing.assert_allclose(store.states["w"][i], want_ci[i]["w"], rtol=1e-4, atol=1e-5)
    # c stays the population mean of the c_i under uniform weighting.
    np.testing.assert_allclose(state.opt_state.control["w"], store.states["w"].mean(axis=0),
                               rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("executor", [
    dict(backend="loop"),
    dict(backend="vmap", clients_per_chunk=2),
    dict(backend="vmap", clients_per_chunk=2, chunk_executor="host"),
    dict(backend="mesh", num_devices=2),
    dict(backend="pmap", num_devices=2),
])
def test_stateful_scaffold_agrees_on_every_executor(executor):
    data = regression_data(4)
    x0 = {"w": np.full(D, 0.1, np.float32), "b": np.float32(0.0)}
    ref, ref_store = run_scaffold(data, COHORTS, 0.05, x0, 4)
    got, store = run_scaffold(data, COHORTS, 0.05, x0, 4, **executor)
    assert toy.max_abs_diff(got.params, ref.params) <= 1e-6
    assert toy.max_abs_diff(store.states, ref_store.states) <= 1e-5


def label_skew(num_clients=8, steps=20, batch=8, classes=4, dim=8, seed=0):
    """Every client holds one class only: strong label skew."""
    rs = np.random.RandomState(seed)
    means = rs.randn(classes, dim)
    y = np.repeat(np.arange(num_clients) % classes, steps * batch).reshape(
        num_clients, steps, batch).astype(np.int32)
    x = (means[y] + rs.randn(num_clients, steps, batch, dim)).astype(np.float32)
    return {"x": x, "y": y, "mask": np.ones(y.shape, np.float32)}


def softmax_loss(params, batch, rng):
    logits = batch["x"] @ params["w"] + params["b"]
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
    return jnp.sum(losses * batch["mask"]) / jnp.maximum(jnp.sum(batch["mask"]), 1.0), {}


def test_scaffold_beats_fedavg_under_label_skew_at_equal_rounds():
    data = label_skew()
    params = {"w": jnp.zeros((8, 4)), "b": jnp.zeros(4)}
    everything = jax.tree.map(lambda x: x.reshape((-1,) + x.shape[3:]), data)
    losses = {}
    for algorithm in (fl.fedavg(softmax_loss, optax.sgd(0.1)), fl.scaffold(softmax_loss, 0.1)):
        engine = fl.FederatedEngine(algorithm, weighting="uniform")
        state = engine.init(params, jax.random.key(0))
        store = engine.new_store(params, 8) if algorithm.stateful else None
        for _ in range(10):
            state = (engine.run_round_with_store(state, store, data, np.arange(8)) if store
                     else engine.run_round(state, data)).state
        losses[algorithm.name] = float(softmax_loss(state.params, everything, None)[0])
    # Measured: FedAvg 0.32, SCAFFOLD 0.24 (client drift corrected).
    assert losses["scaffold"] < 0.9 * losses["fedavg"], losses


def test_scan_over_three_rounds_equals_three_calls():
    algorithm = fl.fedavg(toy.loss_fn, optax.adam(0.05), fl.fedadam(0.05))
    program = fl.make_round(algorithm, fl.ExecutorConfig(clients_per_chunk=2))
    assert program.pure
    engine = fl.FederatedEngine(algorithm)
    cohorts = [fl.make_cohort(toy.client_data(5, seed=r), client_ids=np.arange(5) + r)
               for r in range(3)]
    state = engine.init(toy.init_params(), jax.random.key(0))
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *cohorts)

    @jax.jit
    def three_rounds(state, cohorts):
        return jax.lax.scan(program, state, cohorts)

    scanned, outputs = three_rounds(state, stacked)
    called = state
    for r, cohort in enumerate(cohorts):
        called, out = jax.jit(program)(called, cohort)
        np.testing.assert_allclose(outputs.metrics.client_loss[r], out.metrics.client_loss,
                                   rtol=1e-6)
    assert int(scanned.round) == 3
    assert toy.max_abs_diff(scanned.params, called.params) <= 1e-6
    assert toy.max_abs_diff(scanned.opt_state, called.opt_state) <= 1e-6


def test_coordinate_median_runs_unchunked_and_ignores_an_outlier():
    data = toy.client_data(5, ragged=False)
    data["x"][4] *= 1e3  # one wild client
    median = fl.fedavg(toy.loss_fn, optax.sgd(0.1), aggregator=fl.coordinate_median())
    engines = {b: fl.FederatedEngine(median, fl.ExecutorConfig(backend=b)) for b in
               ("loop", "vmap")}
    params = toy.init_params()
    outs = {b: e.run_round(e.init(params, jax.random.key(0)), data) for b, e in engines.items()}
    # The reference: each client alone (a single-client round returns its model), then the
    # coordinate-wise median in numpy.
    single = fl.FederatedEngine(fl.fedavg(toy.loss_fn, optax.sgd(0.1)))
    models = [single.run_round(single.init(params, jax.random.key(0)),
                               jax.tree.map(lambda x, c=c: x[c:c + 1], data),
                               client_ids=[c]).state.params for c in range(5)]
    for k in params:
        want = np.median(np.stack([np.asarray(m[k]) for m in models]), axis=0)
        for out in outs.values():
            np.testing.assert_allclose(out.state.params[k], want, rtol=1e-5, atol=1e-6)


def test_executors_refuse_what_they_cannot_run():
    median = fl.fedavg(toy.loss_fn, optax.sgd(0.1), aggregator=fl.coordinate_median())
    for executor in (fl.ExecutorConfig(clients_per_chunk=2), fl.ExecutorConfig(backend="pmap")):
        with pytest.raises(fl.UnsupportedError, match="cannot run in chunks"):
            fl.make_round(median, executor)
    scaffold = fl.FederatedEngine(fl.scaffold(toy.loss_fn, 0.1),
                                  fl.ExecutorConfig(backend="mesh", num_devices=2))
    state = scaffold.init(toy.init_params(), jax.random.key(0))
    with pytest.raises(fl.UnsupportedError, match="process-local feeding cannot carry"):
        scaffold.run_round_local(state, toy.client_data(2), num_clients=2)
    with pytest.raises(ValueError, match=r"client_states must be given exactly when"):
        scaffold.run_round(state, toy.client_data(2))
    with pytest.raises(ValueError, match="unknown weighting"):
        fl.FederatedEngine(fl.scaffold(toy.loss_fn, 0.1), weighting="size")


def test_client_state_store_gathers_and_scatters_rows():
    store = fl.ClientStateStore.create(lambda p: {"c": jnp.zeros_like(p)}, jnp.ones(2), 5)
    assert store.population_size == 5 and store.states["c"].shape == (5, 2)
    store.scatter([1, 3], {"c": np.array([[1.0, 2.0], [3.0, 4.0]])})
    np.testing.assert_array_equal(store.gather([3, 1, 0])["c"], [[3, 4], [1, 2], [0, 0]])
    with pytest.raises(ValueError, match=r"client ids must be in \[0, 5\)"):
        store.gather([5])
