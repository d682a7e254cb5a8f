"""Attacks: a seeded, fixed malicious subset of the population; exactly the malicious clients'
messages change, as the formulas say; deterministic given the seed; chunking changes nothing;
ALIE against numpy / scipy; label flipping in the runner; one CLI run end to end."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats

from fedjax_lm import federated as fl
from fedjax_lm.federated.aggregate import Context
from fedjax_lm.federated.attacks import alie_z
from tests.federated import toy

N, C = 20, 6


def test_malicious_set_is_seeded_fixed_and_exact():
    a = fl.malicious_clients(N, 0.3, seed=5)
    assert a.sum() == 6 and a.dtype == bool
    np.testing.assert_array_equal(a, fl.malicious_clients(N, 0.3, seed=5))
    assert not np.array_equal(a, fl.malicious_clients(N, 0.3, seed=6))
    assert fl.malicious_clients(N, 0.0, seed=5).sum() == 0
    with pytest.raises(ValueError, match=r"in \[0, 0.5\), got 0.5"):
        fl.malicious_clients(N, 0.5, seed=0)


def setup(seed=0):
    rs = np.random.RandomState(seed)
    ref = {"w": rs.randn(4, 3).astype(np.float32), "b": rs.randn(3).astype(np.float32)}
    messages = {k: v[None] + 0.1 * rs.randn(C, *v.shape).astype(np.float32)
                for k, v in ref.items()}
    ids = np.array([3, 8, 1, 15, 12, 0], np.int32)
    malicious = np.zeros(N, bool)
    malicious[[8, 15, 0]] = True  # clients at positions 1, 3 and 5 of the cohort
    p = np.array([0.2, 0.2, 0.2, 0.2, 0.2, 0.0], np.float32)  # position 5 is padding
    ctx = Context(jax.tree.map(jnp.asarray, ref), jnp.asarray(ids), jax.random.key(7))
    return ref, messages, ids, malicious, p, ctx


class Capture:
    """An inner aggregator that returns the messages it was handed (to see the attack)."""

    def __new__(cls):
        return fl.Aggregator("capture", lambda m, p: fl.Aggregate(m, jnp.sum(p)))


@pytest.mark.parametrize("kind", ["sign_flip", "scale", "gaussian"])
def test_per_client_attacks_transform_exactly_the_malicious_clients(kind):
    ref, messages, ids, malicious, p, ctx = setup()
    attack = fl.AttackConfig(kind, scale=7.0, std=0.5)
    agg = fl.attacked(Capture(), attack, malicious)
    reduce = jax.jit(agg.reduce)
    seen = reduce(messages, p, ctx).value
    again = reduce(messages, p, ctx).value
    bad = malicious[ids]
    for k in ref:
        np.testing.assert_array_equal(seen[k], again[k])  # deterministic given the key
        np.testing.assert_array_equal(np.asarray(seen[k])[~bad], messages[k][~bad])
        delta = np.asarray(seen[k])[bad] - ref[k]
        honest = messages[k][bad] - ref[k]
        if kind == "sign_flip":
            np.testing.assert_allclose(delta, -honest, rtol=1e-5, atol=1e-6)
        elif kind == "scale":
            np.testing.assert_allclose(delta, 7.0 * honest, rtol=1e-4, atol=1e-5)
        else:  # fresh noise of the stated std, independent of the honest delta
            assert abs(np.std(delta) - 0.5) < 0.25 and not np.allclose(delta, honest)
    if kind == "gaussian":  # another round's key draws other noise
        other = reduce(messages, p, ctx._replace(key=jax.random.key(8))).value
        assert not np.allclose(np.asarray(other["w"])[bad], np.asarray(seen["w"])[bad])


@pytest.mark.parametrize("kind", ["sign_flip", "gaussian"])
def test_per_client_attacks_keep_chunk_sums_exact(kind):
    ref, messages, ids, malicious, p, ctx = setup(1)
    agg = fl.attacked(fl.weighted_mean(), fl.AttackConfig(kind), malicious)
    assert agg.decomposable and agg.contextual
    whole = jax.jit(agg.reduce)(messages, p, ctx).value
    parts = agg.init(jax.tree.map(lambda x: jnp.zeros(x.shape[1:]), messages))
    add = jax.jit(agg.add)
    for lo, hi in ((0, 3), (3, 6)):
        parts = add(parts, jax.tree.map(lambda x, lo=lo, hi=hi: x[lo:hi], messages),
                        p[lo:hi], ctx._replace(client_ids=ctx.client_ids[lo:hi]))
    for k in ref:
        np.testing.assert_allclose(agg.finalize(parts).value[k], whole[k], rtol=1e-5, atol=1e-6)


def test_alie_matches_the_paper_formula_in_numpy():
    ref, messages, ids, malicious, p, ctx = setup(2)
    agg = fl.attacked(Capture(), fl.AttackConfig("alie"), malicious)
    assert not agg.decomposable
    seen = jax.jit(agg.reduce)(messages, p, ctx).value
    live = p > 0
    bad = malicious[ids] & live  # the padding client (id 0) is malicious but not live
    good = live & ~bad
    n, f = live.sum(), bad.sum()  # 5 live, 2 malicious
    s = np.floor(n / 2 + 1) - f
    z = stats.norm.ppf((n - s) / n)
    assert float(alie_z(jnp.float32(n), jnp.float32(f))) == pytest.approx(z, rel=1e-5)
    for k in ref:
        x = messages[k][good]
        want = x.mean(0) - z * x.std(0)
        for row in np.flatnonzero(bad):
            np.testing.assert_allclose(seen[k][row], want, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(np.asarray(seen[k])[~bad], messages[k][~bad])


def test_sign_flip_on_a_real_round_matches_the_per_client_models():
    data = toy.client_data(6, ragged=False)  # equal weights: p = 1/6
    malicious = fl.malicious_clients(6, 0.34, seed=0)  # 2 of 6
    assert malicious.sum() == 2
    params = toy.init_params()
    attack = fl.attacked(fl.weighted_mean(), fl.AttackConfig("sign_flip"), malicious)
    engine = fl.FederatedEngine(fl.fedavg(toy.loss_fn, optax.sgd(0.1), aggregator=attack))
    got = engine.run_round(engine.init(params, jax.random.key(0)), data).state.params
    single = fl.FederatedEngine(fl.fedavg(toy.loss_fn, optax.sgd(0.1)))
    models = [single.run_round(single.init(params, jax.random.key(0)),
                               jax.tree.map(lambda x, c=c: x[c:c + 1], data),
                               client_ids=[c]).state.params for c in range(6)]
    for k in params:
        sent = [2 * np.asarray(params[k]) - np.asarray(m[k]) if malicious[c]
                else np.asarray(m[k]) for c, m in enumerate(models)]
        np.testing.assert_allclose(got[k], np.mean(sent, axis=0), rtol=1e-5, atol=1e-6)


def test_label_flip_poisons_exactly_the_malicious_clients_data():
    from fedjax_lm.runner.checks import from_dict
    from fedjax_lm.runner.experiment import build_experiment, round_data

    np.testing.assert_array_equal(fl.flip_labels(np.array([0, 1, 2, 3]), 4), [3, 2, 1, 0])
    base = {"model": "preset:tiny", "task": "synthetic", "max_train_examples": 96,
            "max_test_examples": 48, "max_length": 16, "batch_size": 8, "clients": 6}
    clean_cfg = from_dict(base)
    cfg = from_dict({**base, "attack": "label_flip", "malicious_fraction": 0.34})
    exp = build_experiment(cfg)
    ids = np.arange(6)
    clean, poisoned = round_data(clean_cfg, exp, 0, ids), round_data(cfg, exp, 0, ids)
    bad = exp.malicious
    assert bad.sum() == 2
    np.testing.assert_array_equal(poisoned["label"][~bad], clean["label"][~bad])
    np.testing.assert_array_equal(poisoned["label"][bad],
                                  exp.num_classes - 1 - clean["label"][bad])
    np.testing.assert_array_equal(poisoned["input_ids"], clean["input_ids"])


@pytest.mark.slow
def test_cli_attack_with_a_robust_aggregator_end_to_end(tmp_path):
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "fedjax_lm.cli", "train", "--model", "preset:tiny",
            "--task", "synthetic", "--max-train-examples", "128", "--max-test-examples", "48",
            "--max-length", "16", "--batch-size", "8", "--local-epochs", "1", "--rounds", "2",
            "--clients", "8", "--aggregator", "krum", "--byzantine", "2", "--attack",
            "sign_flip", "--malicious-fraction", "0.25", "--no-progress", "--out", str(out)]
    run = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    final = json.loads((out / "final.json").read_text())
    assert final["rounds"] == 2
    config = (out / "config.yaml").read_text()
    assert "attack: sign_flip" in config and "aggregator: krum" in config


EXECUTORS = {"scan3": fl.ExecutorConfig(clients_per_chunk=3),
             "host2": fl.ExecutorConfig(clients_per_chunk=2, chunk_executor="host"),
             "loop": fl.ExecutorConfig("loop"), "pmap": fl.ExecutorConfig("pmap", num_devices=4)}


def attacked_rounds(aggregator, config, rounds=2):
    data, ids = toy.client_data(7), np.array([0, 2, 3, 5, 6, 8, 9])
    engine = fl.FederatedEngine(fl.fedavg(toy.loss_fn, optax.sgd(0.1), aggregator=aggregator),
                                config)
    state = engine.init(toy.init_params(), jax.random.key(3))
    for _ in range(rounds):
        state = engine.run_round(state, data, client_ids=ids).state
    return state.params


@pytest.fixture(scope="module")
def gaussian_attack():
    """Gaussian noise under norm bounding, and its vmap result (which the attack moved)."""
    malicious = fl.malicious_clients(10, 0.3, seed=1)
    assert malicious[[0, 2, 3, 5, 6, 8, 9]].sum() >= 1
    agg = fl.attacked(fl.norm_bound(0.05), fl.AttackConfig("gaussian", std=0.3), malicious)
    want = attacked_rounds(agg, fl.ExecutorConfig())
    clean = attacked_rounds(fl.norm_bound(0.05), fl.ExecutorConfig())
    assert toy.max_abs_diff(clean, want) > 1e-4  # the attack did something
    return agg, want


@pytest.mark.parametrize("executor", [
    "scan3", "host2", pytest.param("loop", marks=pytest.mark.slow),
    pytest.param("pmap", marks=pytest.mark.slow)])
def test_a_chunked_attack_gives_the_same_round_on_every_executor(executor, gaussian_attack):
    """The noise is keyed by (round, client id): chunk sums, the host chunk loop, the client
    loop and pmap all see the same attacked, clipped messages."""
    agg, want = gaussian_attack
    assert toy.max_abs_diff(attacked_rounds(agg, EXECUTORS[executor]), want) <= 1e-6


def _alie_reference(messages, ids, malicious, p):
    """numpy ALIE: μ − z·σ over the live benign rows, or the live malicious rows when the
    cohort has no live benign one; dead rows (p = 0) never counted nor changed."""
    live = p > 0
    bad = malicious[ids] & live
    good = live & ~bad
    basis = good if good.any() else bad
    n, f = live.sum(), bad.sum()
    q = np.float32((n - (np.floor(n / 2 + 1) - f)) / n)  # clipped in float32, as alie_z
    z = stats.norm.ppf(np.clip(q, np.float32(1e-6), np.float32(1 - 1e-6)).astype(float))
    out = {}
    for k, x in messages.items():
        want = x[basis].mean(0) - z * x[basis].std(0)
        out[k] = np.where(bad.reshape((-1,) + (1,) * (x.ndim - 1)), want[None], x)
    return out, bad


def _alie_seen(messages, malicious, p, ctx):
    agg = fl.attacked(Capture(), fl.AttackConfig("alie"), malicious)
    return jax.jit(agg.reduce)(messages, jnp.asarray(p), ctx).value


def test_alie_mixed_cohort_is_mean_minus_z_std_of_the_benign_rows():
    ref, messages, ids, malicious, p, ctx = setup(3)
    seen = _alie_seen(messages, malicious, p, ctx)
    want, bad = _alie_reference(messages, ids, malicious, p)
    assert bad.sum() == 2  # two live attackers among five live clients
    for k in ref:
        np.testing.assert_allclose(seen[k], want[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("attackers", [[8], [8, 15, 0]])
def test_alie_all_malicious_cohort_uses_the_attackers_own_honest_messages(attackers):
    ref, messages, ids, _, _, ctx = setup(4)
    malicious = np.zeros(N, bool)
    malicious[attackers] = True
    p = np.isin(ids, attackers).astype(np.float32)  # only the attackers are live
    seen = _alie_seen(messages, malicious, p, ctx)
    want, bad = _alie_reference(messages, ids, malicious, p)
    assert bad.sum() == len(attackers)
    for k in ref:
        np.testing.assert_allclose(seen[k], want[k], rtol=1e-5, atol=1e-6)
        assert np.all(np.isfinite(seen[k])) and np.abs(np.asarray(seen[k])[bad]).max() > 0.1
        if len(attackers) == 1:  # a lone attacker: σ = 0, so its honest model, never zeros
            np.testing.assert_allclose(np.asarray(seen[k])[bad][0], messages[k][bad][0],
                                       rtol=1e-6, atol=1e-6)


def test_alie_ignores_padded_and_zero_weight_rows():
    ref, messages, ids, malicious, p, ctx = setup(5)
    p = np.array([0.25, 0.25, 0.0, 0.25, 0.25, 0.0], np.float32)  # a dead benign row, padding
    far = {k: v.copy() for k, v in messages.items()}
    for k in far:  # dead rows as far off as possible: they must change nothing
        far[k][2] = 1e6
        far[k][5] = -1e6
    seen = _alie_seen(far, malicious, p, ctx)
    want, bad = _alie_reference(messages, ids, malicious, p)
    assert list(np.flatnonzero(bad)) == [1, 3]
    for k in ref:
        live = p > 0
        np.testing.assert_allclose(np.asarray(seen[k])[live], want[k][live], rtol=1e-5,
                                   atol=1e-6)
        np.testing.assert_array_equal(np.asarray(seen[k])[~live], far[k][~live])
    # A cohort with no live row at all changes nothing.
    none = _alie_seen(messages, malicious, np.zeros(C, np.float32), ctx)
    for k in ref:
        np.testing.assert_array_equal(none[k], messages[k])
