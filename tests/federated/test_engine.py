"""The federated round: backends agree, FedAvg is what it claims, padding is inert."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_lm import federated as fl
from fedjax_lm.federated.compilation import count_compilations
from tests.federated import toy


def run(engine, params, data, rounds=3, seed=0, **kw):
    state = engine.init(params, jax.random.key(seed))
    for _ in range(rounds):
        out = engine.run_round(state, data, **kw)
        state = out.state
    return state, out


def gather(tree, ids):
    return jax.tree.map(lambda x: x[ids], tree)


@pytest.fixture(scope="module")
def backends_result():
    """3 rounds of FedAdam/Adam with ragged clients and 6-of-10 partial participation."""
    population = toy.client_data(10)
    params = toy.init_params()
    results = {}
    configs = [
        ("loop", None, "scan"),
        ("vmap", None, "scan"),
        ("vmap", 4, "scan"),
        ("vmap", 4, "host"),
        ("mesh", None, "scan"),
        ("mesh", 4, "host"),
        ("pmap", None, "scan"),
    ]
    for backend, chunk, executor in configs:
        engine = fl.build_engine(
            toy.loss_fn, optax.adam(0.05), fl.fedadam(0.05),
            backend=backend, clients_per_chunk=chunk, chunk_executor=executor, num_devices=4
            if backend in ("mesh", "pmap") else None,
        )
        state = engine.init(params, jax.random.key(7))
        for r in range(3):
            ids = fl.sample_clients(fl.sampling_key(state.rng, r), 10, 6)
            out = engine.run_round(state, gather(population, ids), client_ids=ids)
            state = out.state
        results[(backend, chunk, executor)] = (state, out.metrics)
    return results


def test_backends_agree_after_three_rounds(backends_result):
    assert jax.device_count() >= 4, "conftest should provide 8 fake CPU devices"
    ref_state, ref_metrics = backends_result[("loop", None, "scan")]
    assert int(ref_state.round) == 3
    for key, (state, metrics) in backends_result.items():
        assert toy.max_abs_diff(state.params, ref_state.params) <= 1e-5, key
        assert toy.max_abs_diff(state.opt_state, ref_state.opt_state) <= 1e-5, key
        np.testing.assert_allclose(metrics.client_loss, ref_metrics.client_loss, atol=1e-5)
        np.testing.assert_array_equal(metrics.client_examples, ref_metrics.client_examples)
        assert metrics.client_loss.shape == (6,)


def test_mesh_backend_shards_over_devices():
    engine = fl.build_engine(toy.loss_fn, optax.sgd(0.1), backend="mesh", num_devices=4)
    state = engine.init(toy.init_params(), jax.random.key(0))
    assert engine.mesh.shape == {"clients": 4}
    assert state.params["w"].sharding.is_fully_replicated
    assert len(state.params["w"].sharding.device_set) == 4
    # 6 clients are padded to 8 (a multiple of 4 devices) with zero-weight clients.
    out = engine.run_round(state, toy.client_data(6))
    assert out.metrics.client_loss.shape == (6,)
    ref = fl.build_engine(toy.loss_fn, optax.sgd(0.1), backend="vmap")
    ref_out = ref.run_round(ref.init(toy.init_params(), jax.random.key(0)), toy.client_data(6))
    assert toy.max_abs_diff(out.state.params, ref_out.state.params) <= 1e-6


@pytest.mark.parametrize("backend", ["loop", "vmap"])
def test_one_client_fedavg_equals_centralised_training(backend):
    """1 client × 1 round of FedAvg is exactly S steps of SGD on the same batches/keys."""
    data = toy.client_data(1, steps=4, ragged=False)
    params = toy.init_params()
    rng = jax.random.key(3)
    engine = fl.build_engine(toy.loss_fn, optax.sgd(0.3), fl.averaging(), backend=backend)
    out = engine.run_round(engine.init(params, rng), data)

    opt = optax.sgd(0.3)
    step_keys = jax.random.split(fl.client_key(rng, 0, 0), 4)

    @jax.jit
    def sgd_step(p, s, batch, key):
        g = jax.grad(lambda p: toy.loss_fn(p, batch, key)[0])(p)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s

    p, s = params, opt.init(params)
    for t in range(4):
        p, s = sgd_step(p, s, jax.tree.map(lambda x, t=t: x[0, t], data), step_keys[t])
    for a, b in zip(jax.tree.leaves(out.state.params), jax.tree.leaves(p), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_weighted_mean_hand_computed():
    messages = {"w": jnp.array([[1.0, 2.0], [3.0, 4.0], [10.0, -10.0]])}
    p = fl.normalize_weights(jnp.array([1.0, 3.0, 4.0]))
    mean = fl.weighted_mean()
    # (1·[1,2] + 3·[3,4] + 4·[10,-10]) / 8 = [50, -26] / 8
    np.testing.assert_allclose(mean.reduce(messages, p).value["w"], [6.25, -3.25], rtol=1e-6)
    # Chunk sums give the same mean: [0] then [1, 2].
    partial = mean.init({"w": jnp.zeros(2)})
    partial = mean.add(partial, jax.tree.map(lambda x: x[:1], messages), p[:1])
    partial = mean.add(partial, jax.tree.map(lambda x: x[1:], messages), p[1:])
    np.testing.assert_allclose(mean.finalize(partial).value["w"], [6.25, -3.25], rtol=1e-6)
    # A dropped client (weight 0) leaves the others' mean, renormalised.
    agg = mean.reduce(messages, p.at[2].set(0.0))
    np.testing.assert_allclose(agg.value["w"], [2.5, 3.5], rtol=1e-6)
    np.testing.assert_allclose(agg.weight, 0.5, rtol=1e-6)
    # No contributing client: weight 0 and a zero value (the server keeps its model).
    assert float(mean.reduce(messages, jnp.zeros(3)).weight) == 0.0


def test_round_weights_clients_by_examples_and_uniform():
    """The server model is the example-weighted mean of independently trained clients."""
    data = toy.client_data(3)
    params = toy.init_params()
    rng = jax.random.key(1)
    singles = []
    for c in range(3):
        eng = fl.build_engine(toy.loss_fn, optax.sgd(0.2), backend="vmap")
        out = eng.run_round(eng.init(params, rng), gather(data, [c]), client_ids=[c])
        singles.append(out.state.params)
    n = data["mask"].sum(axis=(1, 2))
    for weighting, w in [("examples", n), ("uniform", np.ones(3))]:
        eng = fl.build_engine(toy.loss_fn, optax.sgd(0.2), backend="vmap", weighting=weighting)
        out = eng.run_round(eng.init(params, rng), data)
        expected = jax.tree.map(
            lambda *xs, w=w: sum(wi * x for wi, x in zip(w, xs, strict=True)) / w.sum(), *singles
        )
        assert toy.max_abs_diff(out.state.params, expected) <= 1e-6
        np.testing.assert_array_equal(out.metrics.client_examples, n)


def test_padding_changes_nothing():
    """Extra all-padding steps, batch slots and clients do not move the result."""
    data = toy.client_data(3)
    params = toy.init_params()
    engine = fl.build_engine(toy.loss_fn, optax.adam(0.1), backend="vmap")
    base = engine.run_round(engine.init(params, jax.random.key(0)), data)

    padded = jax.tree.map(lambda x: np.concatenate([x, np.zeros_like(x[:, :2])], axis=1), data)
    more = engine.run_round(engine.init(params, jax.random.key(0)), padded)
    # Padded steps come after the real ones, so each client's real steps see the same keys.
    assert toy.max_abs_diff(base.state.params, more.state.params) <= 1e-7

    extra_client = jax.tree.map(lambda x: np.concatenate([x, np.zeros_like(x[:1])]), data)
    out = engine.run_round(engine.init(params, jax.random.key(0)), extra_client)
    assert toy.max_abs_diff(base.state.params, out.state.params) <= 1e-7
    assert float(out.metrics.client_examples[3]) == 0.0


def test_all_padding_step_leaves_params_and_adam_state_unchanged():
    algorithm = fl.fedavg(toy.loss_fn, optax.adam(0.1), carry_optimizer_state=True)
    params = toy.init_params()
    server = fl.FederatedEngine(algorithm).init(params, jax.random.key(0))
    client = fl.ClientInfo(jnp.int32(0), jax.random.key(0), jnp.float32(1.0),
                           optax.adam(0.1).init(params))
    update = jax.jit(lambda data: fl.train_client(algorithm, server, client, data))
    data = jax.tree.map(lambda x: x[0], toy.client_data(1, steps=2, ragged=False))
    data["mask"][1] = 0.0  # the second step is all padding
    both = update(data)
    # What the padded step holds is irrelevant: same program, bitwise the same result.
    other = jax.tree.map(np.copy, data)
    other["x"][1] = 100.0
    other["y"][1] = 0
    assert toy.max_abs_diff(both.output.message, update(other).output.message) == 0.0
    first_only = update(jax.tree.map(lambda x: x[:1], data))
    assert toy.max_abs_diff(both.output.message, first_only.output.message) <= 1e-7
    assert toy.max_abs_diff(both.output.client_state, first_only.output.client_state) <= 1e-7
    assert int(both.output.client_state[0].count) == 1  # Adam's step counter did not advance
    assert float(both.examples) == 4.0


def _fedopt_reference(kind, x0, mean, lr, b1=0.9, b2=0.99, tau=1e-3):
    """Reddi et al. 2021, Algorithm 2, first round, written out in numpy."""
    delta = mean - x0
    m = (1 - b1) * delta if kind != "adagrad" else delta
    v0 = tau**2
    v = {
        "adam": b2 * v0 + (1 - b2) * delta**2,
        "yogi": v0 - (1 - b2) * delta**2 * np.sign(v0 - delta**2),
        "adagrad": v0 + delta**2,
    }[kind]
    return x0 + lr * m / (np.sqrt(v) + tau)


@pytest.mark.parametrize("name", ["fedadam", "fedyogi", "fedadagrad", "fedavgm"])
def test_server_optimizers_match_reference(name):
    data = toy.client_data(4)
    params = toy.init_params()
    rng = jax.random.key(0)
    fedavg = fl.build_engine(toy.loss_fn, optax.sgd(0.5), fl.averaging())
    mean = fedavg.run_round(fedavg.init(params, rng), data).state.params
    server = fl.make_server_optimizer(name, 0.3)
    engine = fl.build_engine(toy.loss_fn, optax.sgd(0.5), server)
    state = engine.init(params, rng)
    out = engine.run_round(state, data)
    for k in params:
        x0, m = np.asarray(params[k]), np.asarray(mean[k])
        if name == "fedavgm":
            expected = x0 + 0.3 * (m - x0)  # momentum buffer starts at zero: v = Δ
        else:
            expected = _fedopt_reference(name[3:], x0, m, 0.3)
        np.testing.assert_allclose(out.state.params[k], expected, rtol=1e-5, atol=1e-6)


def test_fedavgm_second_round_uses_momentum():
    data = toy.client_data(2)
    engine = fl.build_engine(toy.loss_fn, optax.sgd(0.5), fl.fedavgm(1.0, momentum=0.5))
    state = engine.init(toy.init_params(), jax.random.key(0))
    s1 = engine.run_round(state, data).state
    x0 = toy.init_params()
    x1 = jax.tree.map(np.asarray, s1.params)
    # Reproduce round 2 by hand: mean of clients from x1 with round-1 keys.
    plain = fl.build_engine(toy.loss_fn, optax.sgd(0.5), fl.averaging())
    s = plain.init(x1, jax.random.key(0)).replace(round=jnp.int32(1))
    mean2 = plain.run_round(s, data).state.params
    s2 = engine.run_round(s1, data).state
    for k, x in x1.items():
        v1 = x - np.asarray(x0[k])  # round 1 (lr 1): v1 = Δ1 and x1 = x0 + v1
        v2 = 0.5 * v1 + (np.asarray(mean2[k]) - x)
        np.testing.assert_allclose(s2.params[k], x + v2, rtol=1e-5, atol=1e-6)


def test_fedprox_mu_zero_is_fedavg_and_mu_pulls_towards_server():
    data = toy.client_data(3)
    params = toy.init_params()
    outs = {}
    for mu in (0.0, 1.0):
        eng = fl.build_engine(toy.loss_fn, optax.sgd(0.3), prox_mu=mu)
        outs[mu] = eng.run_round(eng.init(params, jax.random.key(0)), data)
    plain = fl.build_engine(toy.loss_fn, optax.sgd(0.3))
    ref = plain.run_round(plain.init(params, jax.random.key(0)), data)
    assert toy.max_abs_diff(outs[0.0].state.params, ref.state.params) == 0.0
    # The proximal term is zero on a client's first step (w = w_server), so a client
    # with a single real step is unaffected; every longer one moves less.
    prox_norm, plain_norm = outs[1.0].metrics.client_update_norm, ref.metrics.client_update_norm
    steps = (data["mask"].sum(axis=2) > 0).sum(axis=1)
    np.testing.assert_array_equal(steps, [3, 1, 3])
    np.testing.assert_allclose(prox_norm[1], plain_norm[1], rtol=1e-6)
    assert prox_norm[0] < plain_norm[0] and prox_norm[2] < plain_norm[2]
    with pytest.raises(ValueError, match="mu must be >= 0"):
        fl.build_engine(toy.loss_fn, optax.sgd(0.3), prox_mu=-1.0)


def test_chunked_equals_unchunked_for_many_widths():
    data = toy.client_data(7)
    params = toy.init_params()
    ref_engine = fl.build_engine(toy.loss_fn, optax.adam(0.05))
    ref, _ = run(ref_engine, params, data, rounds=2)
    for k in (1, 3, 8):
        for executor in ("scan", "host"):
            eng = fl.build_engine(
                toy.loss_fn, optax.adam(0.05), clients_per_chunk=k, chunk_executor=executor
            )
            state, out = run(eng, params, data, rounds=2)
            assert toy.max_abs_diff(state.params, ref.params) <= 1e-6, (k, executor)
            assert out.metrics.client_loss.shape == (7,)


def test_sampling_is_deterministic_and_without_replacement():
    key = jax.random.key(42)
    a = fl.sample_clients(key, 100, 10)
    np.testing.assert_array_equal(a, fl.sample_clients(key, 100, 10))
    assert len(set(a.tolist())) == 10 and a.min() >= 0 and a.max() < 100
    assert not np.array_equal(a, fl.sample_clients(jax.random.key(43), 100, 10))
    np.testing.assert_array_equal(fl.sample_clients(key, 5, 5), np.arange(5))
    # Over many rounds every client is drawn about equally often.
    counts = np.zeros(20)
    for r in range(400):
        counts[fl.sample_clients(fl.sampling_key(key, r), 20, 5)] += 1
    assert counts.sum() == 2000 and counts.min() > 60 and counts.max() < 140
    with pytest.raises(ValueError, match="cohort size"):
        fl.sample_clients(key, 5, 6)


def test_round_compiles_once_over_five_rounds():
    engine = fl.build_engine(toy.loss_fn, optax.adam(0.05), fl.fedadam(0.1))
    data = toy.client_data(4)
    state = engine.init(toy.init_params(), jax.random.key(0))
    state = engine.run_round(state, data).state
    with count_compilations() as compiles:
        for _ in range(4):
            state = engine.run_round(state, data).state
        jax.block_until_ready(state)
    assert compiles.count == 0
    assert engine.compiled_executables() == {"round": 1}
    assert int(state.round) == 5


def test_chunk_step_compiles_once_across_client_counts():
    engine = fl.build_engine(
        toy.loss_fn, optax.sgd(0.1), clients_per_chunk=4, chunk_executor="host"
    )
    params = toy.init_params()
    for c in (4, 8, 16):
        state = engine.init(params, jax.random.key(0))
        for _ in range(2):
            state = engine.run_round(state, toy.client_data(c)).state
    assert engine.compiled_executables() == {"finish": 1, "chunk": 1}
    # Cohorts smaller than the chunk are padded to it: still the same executable.
    for c in (1, 2):
        engine.run_round(engine.init(params, jax.random.key(0)), toy.client_data(c))
    assert engine.compiled_executables()["chunk"] == 1


def test_pmap_rounds_do_not_recompile():
    engine = fl.build_engine(toy.loss_fn, optax.sgd(0.1), backend="pmap", num_devices=2)
    data = toy.client_data(4)
    state = engine.run_round(engine.init(toy.init_params(), jax.random.key(0)), data).state
    with count_compilations() as compiles:
        for _ in range(2):
            state = engine.run_round(state, data).state
        jax.block_until_ready(state)
    assert compiles.count == 0
    assert engine.compiled_executables() == {}  # pmap's program keeps no countable cache


def test_carried_client_state_loop_equals_vmap_and_differs_from_fresh():
    data = toy.client_data(3)
    params = toy.init_params()
    finals = {}
    for backend in ("loop", "vmap", "mesh"):
        eng = fl.build_engine(toy.loss_fn, optax.adam(0.05), backend=backend,
                              carry_client_state=True, num_devices=2 if backend == "mesh" else None)
        state = eng.init(params, jax.random.key(0))
        cs = eng.init_client_states(params, 3)
        for _ in range(2):
            state, _, cs = eng.run_round(state, data, client_states=cs)
        finals[backend] = (state, cs)
    assert toy.max_abs_diff(finals["loop"][0].params, finals["vmap"][0].params) <= 1e-6
    assert toy.max_abs_diff(finals["loop"][1], finals["mesh"][1]) <= 1e-6
    assert int(jax.tree.leaves(finals["vmap"][1])[0][0]) == 6  # adam count: 2 rounds × 3 steps
    fresh, _ = run(fl.build_engine(toy.loss_fn, optax.adam(0.05)), params, data, rounds=2)
    assert toy.max_abs_diff(fresh.params, finals["vmap"][0].params) > 1e-4


def test_non_finite_client_is_excluded_and_reported():
    data = toy.client_data(3)
    bad = jax.tree.map(np.copy, data)
    bad["x"][1, 0, 0, 0] = np.nan
    params = toy.init_params()
    for backend in ("loop", "vmap"):
        eng = fl.build_engine(toy.loss_fn, optax.sgd(0.1), backend=backend)
        out = eng.run_round(eng.init(params, jax.random.key(0)), bad)
        np.testing.assert_array_equal(out.metrics.client_finite, [True, False, True])
        ref = eng.run_round(eng.init(params, jax.random.key(0)), gather(data, [0, 2]),
                            client_ids=[0, 2])
        assert toy.max_abs_diff(out.state.params, ref.state.params) <= 1e-6
        assert np.isfinite(float(out.metrics.loss))


def test_clear_errors_for_bad_input():
    engine = fl.build_engine(toy.loss_fn, optax.sgd(0.1))
    state = engine.init(toy.init_params(), jax.random.key(0))
    data = toy.client_data(2)
    with pytest.raises(ValueError, match=r"data\['mask'\]"):
        engine.run_round(state, {k: v for k, v in data.items() if k != "mask"})
    with pytest.raises(ValueError, match=r"must be \[C, S, B\]"):
        engine.run_round(state, {**data, "mask": data["mask"][:, 0]})
    with pytest.raises(ValueError, match=r"\['x'\] has shape"):
        engine.run_round(state, {**data, "x": data["x"][:1]})
    with pytest.raises(ValueError, match="client_ids must have shape"):
        engine.run_round(state, data, client_ids=[0, 1, 2])
    with pytest.raises(ValueError, match="client_states must be given"):
        engine.run_round(state, data, client_states={})
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        fl.EngineConfig(backend="gpu")
    with pytest.raises(ValueError, match="pmap"):
        fl.EngineConfig(backend="pmap", clients_per_chunk=2)
    with pytest.raises(ValueError, match="unknown server optimizer"):
        fl.make_server_optimizer("fedsgd")
    with pytest.raises(ValueError, match="only 8 devices"):
        fl.build_engine(toy.loss_fn, optax.sgd(0.1), backend="mesh", num_devices=99)
