"""Personalisation: mixture math, frozen global model, what is aggregated, opt-out, early
stopping — on a tiny linear classifier so everything runs in seconds."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lm.personalize import (
    Classifier,
    FedAvgConfig,
    FitConfig,
    broadcast_clients,
    fit_clients,
    make_eval_fn,
    mix_log_probs,
    mixture_eval,
    mixture_log_probs,
    mixture_loss,
    opt_out_clients,
    participants,
    run_fedavg,
    single_eval,
    single_loss,
)
from fedjax_lm.personalize.clients import make_fitter, select_clients
from fedjax_lm.personalize.fedavg import make_fedavg_engine
from fedjax_lm.personalize.mixture import engine_loss

DIM, K = 6, 3


def linear(num_out: int) -> Classifier:
    def init(key):
        return {"w": 0.1 * jax.random.normal(key, (DIM, num_out)), "b": jnp.zeros((num_out,))}

    return Classifier(init, lambda p, b, train, rng: b["x"] @ p["w"] + p["b"])


def features(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rs = np.random.RandomState(seed)
    x = rs.randn(n, DIM).astype(np.float32)
    return {"x": x, "label": (x[:, :K].argmax(-1)).astype(np.int32)}


def batch(n: int = 8, seed: int = 0) -> dict[str, jnp.ndarray]:
    f = features(n, seed)
    return {"x": jnp.asarray(f["x"]), "label": jnp.asarray(f["label"]), "mask": jnp.ones(n)}


def client_data(c: int, s: int, b: int, seed: int) -> dict[str, jnp.ndarray]:
    f = features(c * s * b, seed)
    out = {k: jnp.asarray(v.reshape((c, s, b) + v.shape[1:])) for k, v in f.items()}
    out["mask"] = jnp.ones((c, s, b))
    return out


def leaves_equal(a, b) -> bool:
    return all(bool(jnp.array_equal(x, y)) for x, y in
               zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


# ----------------------------------------------------------------------------- mixture math


def test_mixture_gate_one_is_local_and_zero_is_global_exactly():
    rs = np.random.RandomState(0)
    local = jax.nn.log_softmax(jnp.asarray(rs.randn(5, K), jnp.float32))
    glob = jax.nn.log_softmax(jnp.asarray(rs.randn(5, K), jnp.float32))
    assert jnp.array_equal(mix_log_probs(jnp.ones(5), local, glob), local)
    assert jnp.array_equal(mix_log_probs(jnp.zeros(5), local, glob), glob)
    half = mix_log_probs(jnp.full(5, 0.5), local, glob)
    np.testing.assert_allclose(half, 0.5 * (local + glob), rtol=1e-6)


def test_mixture_log_probs_saturated_gate_picks_the_expert():
    clf, gate = linear(K), linear(1)
    key = jax.random.key(0)
    glob, expert = clf.init(key), clf.init(jax.random.key(1))
    b = batch()
    for bias, want in ((100.0, expert), (-100.0, glob)):  # sigmoid(±100) is exactly 1 / 0
        g = {"w": jnp.zeros((DIM, 1)), "b": jnp.full((1,), bias)}
        logp, gv = mixture_log_probs(clf, gate, {"expert": expert, "gate": g}, glob, b,
                                     train=False)
        ref = jax.nn.log_softmax(clf.logits(want, b, False, None))
        np.testing.assert_array_equal(np.asarray(logp), np.asarray(ref))


def test_mixture_loss_has_no_gradient_to_the_global_model():
    clf, gate = linear(K), linear(1)
    loss = mixture_loss(clf, gate)
    personal = {"expert": clf.init(jax.random.key(1)), "gate": gate.init(jax.random.key(2))}
    glob = clf.init(jax.random.key(0))
    g_global = jax.grad(lambda gp: loss(personal, batch(), None, gp)[0])(glob)
    assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(g_global))
    g_personal = jax.grad(lambda p: loss(p, batch(), None, glob)[0])(personal)
    assert set(g_personal) == {"expert", "gate"}
    assert any(float(jnp.abs(x).max()) > 0 for x in jax.tree.leaves(g_personal))


# ----------------------------------------------------------------------------- vectorised fit


def test_global_params_do_not_change_while_the_mixture_trains():
    clf, gate = linear(K), linear(1)
    c = 3
    glob = clf.init(jax.random.key(0))
    before = jax.tree.map(np.array, glob)
    personal = {"expert": broadcast_clients(glob, c),
                "gate": jax.vmap(gate.init)(jax.random.split(jax.random.key(1), c))}
    fitter = make_fitter(mixture_loss(clf, gate), mixture_eval(clf, gate),
                         FitConfig(lr=0.05, max_epochs=3, patience=5))
    val = client_data(c, 2, 4, seed=9)
    res = fit_clients(fitter, personal, lambda e: client_data(c, 3, 4, seed=e), val,
                      jax.random.key(3), frozen=glob)
    assert leaves_equal(glob, before)
    assert set(res.params) == {"expert", "gate"}
    assert not leaves_equal(res.params["gate"], personal["gate"])  # the gate did train


def test_early_stopping_keeps_each_clients_best_params():
    """Client 0 trains on its validation data (improves); client 1 on flipped labels (gets worse
    on validation), so it must keep its initial params (best epoch 0)."""
    clf = linear(K)
    c = 2
    init = broadcast_clients(clf.init(jax.random.key(0)), c)
    val = client_data(c, 2, 8, seed=5)

    def train(epoch):
        d = dict(val)
        d["label"] = d["label"].at[1].set((d["label"][1] + 1) % K)
        return d

    fitter = make_fitter(single_loss(clf), single_eval(clf),
                         FitConfig(lr=0.1, max_epochs=6, patience=2))
    res = fit_clients(fitter, init, train, val, jax.random.key(0))
    assert res.best_epoch[0] > 0 and res.best_epoch[1] == 0
    assert leaves_equal(jax.tree.map(lambda x: x[1], res.params),
                        jax.tree.map(lambda x: x[1], init))
    picked = select_clients(jnp.array([True, False]), broadcast_clients({"a": jnp.ones(2)}, 2),
                            broadcast_clients({"a": jnp.zeros(2)}, 2))
    np.testing.assert_array_equal(picked["a"], [[1, 1], [0, 0]])


def test_a_model_from_scratch_never_keeps_its_random_init():
    """Same flipped-label client as above: with keep_initial False the best *trained* epoch
    is kept even though the init had the lowest validation loss."""
    clf = linear(K)
    init = broadcast_clients(clf.init(jax.random.key(0)), 1)
    val = client_data(1, 2, 8, seed=5)
    flipped = dict(val, label=(val["label"] + 1) % K)
    fitter = make_fitter(single_loss(clf), single_eval(clf),
                         FitConfig(lr=0.1, max_epochs=6, patience=2, keep_initial=False))
    res = fit_clients(fitter, init, lambda e: flipped, val, jax.random.key(0))
    assert res.best_epoch[0] >= 1
    assert not leaves_equal(res.params, init)


def test_gate_variance_matches_numpy_per_client():
    """`gate_var` is the variance of g over each client's real examples (padding excluded)."""
    clf, gate = linear(K), linear(1)
    c = 2
    glob = clf.init(jax.random.key(0))
    personal = {"expert": broadcast_clients(glob, c),
                "gate": jax.vmap(gate.init)(jax.random.split(jax.random.key(1), c))}
    data = client_data(c, 2, 5, seed=3)
    data["mask"] = data["mask"].at[1, 1, 3:].set(0.0)  # client 1: two padded examples
    ev = make_eval_fn(mixture_eval(clf, gate))(personal, data, glob)
    for i in range(c):
        x = np.asarray(data["x"][i]).reshape(-1, DIM)
        keep = np.asarray(data["mask"][i]).reshape(-1) > 0
        p = {k: v[i] for k, v in personal["gate"].items()}
        g = 1 / (1 + np.exp(-(x @ np.asarray(p["w"]) + np.asarray(p["b"]))[:, 0]))[keep]
        np.testing.assert_allclose(float(ev["gate"][i]), g.mean(), rtol=1e-5)
        np.testing.assert_allclose(float(ev["gate_var"][i]), g.var(), rtol=1e-3, atol=1e-7)
    assert float(ev["gate_var"].min()) > 0  # this gate does depend on its input


def test_one_model_on_each_clients_data_equals_each_client_alone():
    """params_axis=None (the FedAvg model on every client's data) maps over clients one at a
    time; each client's loss and accuracy equal that client evaluated by itself."""
    clf = linear(K)
    glob = clf.init(jax.random.key(0))
    data = client_data(3, 2, 5, seed=4)
    data["mask"] = data["mask"].at[2, 1, 2:].set(0.0)  # client 2: three padded examples
    ev = make_eval_fn(single_eval(clf), params_axis=None)(glob, data, None)
    for i in range(3):
        x = np.asarray(data["x"][i]).reshape(-1, DIM)
        y = np.asarray(data["label"][i]).reshape(-1)
        keep = np.asarray(data["mask"][i]).reshape(-1) > 0
        logits = x @ np.asarray(glob["w"]) + np.asarray(glob["b"])
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        np.testing.assert_allclose(float(ev["loss"][i]),
                                   -logp[keep, y[keep]].mean(), rtol=1e-5)
        np.testing.assert_allclose(float(ev["accuracy"][i]),
                                   (logits.argmax(-1) == y)[keep].mean(), rtol=1e-6)


# ----------------------------------------------------------------------------- FedAvg


class SpyEngine:
    """Records every pytree handed to the engine."""

    def __init__(self, engine):
        self.engine, self.seen = engine, []

    def init(self, params, rng):
        self.seen.append(params)
        return self.engine.init(params, rng)

    def run_round(self, state, data, **kw):
        self.seen.append(state.params)
        return self.engine.run_round(state, data, **kw)


def _fedavg_setup(num_clients=6, per_client=12):
    feats = features(num_clients * per_client, seed=1)
    part = [np.arange(c * per_client, (c + 1) * per_client) for c in range(num_clients)]
    cfg = FedAvgConfig(rounds=3, cohort_size=3, local_epochs=1, batch_size=4, lr=0.05,
                       eval_every=1, patience=10)
    return feats, part, cfg


def test_only_the_global_model_is_aggregated():
    clf = linear(K)
    feats, part, cfg = _fedavg_setup()
    spy = SpyEngine(make_fedavg_engine(engine_loss(clf), cfg))
    glob = clf.init(jax.random.key(0))
    res = run_fedavg(spy, glob, feats, part, np.arange(6), cfg, seed=0)
    structure = jax.tree.structure(glob)
    assert len(spy.seen) == 1 + cfg.rounds
    for tree in spy.seen:
        assert jax.tree.structure(tree) == structure
        assert set(tree) == {"w", "b"}  # no "expert", no "gate"
    assert jax.tree.structure(res.params) == structure


def test_opt_out_clients_never_reach_the_average():
    clf = linear(K)
    feats, part, cfg = _fedavg_setup()
    out = opt_out_clients(6, 0.34, seed=0)
    assert len(out) == 2
    pool = participants(6, out)
    assert set(pool) | set(out) == set(range(6)) and not set(pool) & set(out)
    engine = make_fedavg_engine(engine_loss(clf), cfg)
    glob = clf.init(jax.random.key(0))
    a = run_fedavg(engine, glob, feats, part, pool, cfg, seed=0).params
    changed = {k: v.copy() for k, v in feats.items()}
    for c in out:
        changed["x"][part[c]] = 100.0 * np.random.RandomState(c).randn(len(part[c]), DIM)
        changed["label"][part[c]] = (changed["label"][part[c]] + 1) % K
    b = run_fedavg(engine, glob, changed, part, pool, cfg, seed=0).params
    assert leaves_equal(a, b)
    # ...while changing a participant's data does change the model (the check has teeth).
    changed["x"][part[pool[0]]] += 1.0
    c_all = run_fedavg(engine, glob, changed, part, np.arange(6), cfg, seed=0).params
    assert not leaves_equal(a, c_all)


def test_fedavg_early_stopping_returns_the_best_validation_model():
    clf = linear(K)
    feats, part, cfg = _fedavg_setup()
    engine = make_fedavg_engine(engine_loss(clf), cfg)
    glob = clf.init(jax.random.key(0))
    losses = iter([5.0, 1.0, 2.0, 3.0])  # initial, rounds 1..3: round 1 is best
    res = run_fedavg(engine, glob, feats, part, np.arange(6), cfg, seed=0,
                     val_loss=lambda p: next(losses))
    assert res.best_round == 1 and res.rounds_run == 3
    first = run_fedavg(engine, glob, feats, part, np.arange(6),
                       FedAvgConfig(**{**cfg.__dict__, "rounds": 1}), seed=0).params
    assert leaves_equal(res.params, first)


def test_fedavg_early_stopping_never_keeps_the_initial_model():
    """Round 0 (the random init) has the lowest validation loss here, yet the best trained
    round is returned: early stopping picks among trained models only, and logs round 0."""
    clf = linear(K)
    feats, part, cfg = _fedavg_setup()
    engine = make_fedavg_engine(engine_loss(clf), cfg)
    glob = clf.init(jax.random.key(0))
    losses = iter([0.1, 2.0, 1.5, 3.0])  # initial best, then round 2 is the best trained one
    res = run_fedavg(engine, glob, feats, part, np.arange(6), cfg, seed=0,
                     val_loss=lambda p: next(losses))
    assert res.best_round == 2 and res.rounds_run == 3
    assert [h["round"] for h in res.history] == [0, 1, 2, 3]
    assert res.history[0]["val_loss"] == 0.1
    assert not leaves_equal(res.params, glob)


def test_opt_out_fraction_is_validated():
    with pytest.raises(ValueError, match="opt-out fraction"):
        opt_out_clients(10, 1.0, seed=0)
