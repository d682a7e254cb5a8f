"""Parameter-efficient clients in the engine: only the trainable leaves are per-client."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_lm import federated as fl
from fedjax_lm.federated import trainable as tr
from fedjax_lm.federated.sampling import client_key
from tests.federated import toy

MASK = {"w": False, "b": True, "v": True}  # w frozen; b and v train


def params3(seed=0):
    p = toy.init_params(seed)
    return {**p, "v": jnp.full((toy.CLASSES,), 0.5, jnp.float32)}


def loss3(params, batch, rng):
    return toy.loss_fn({"w": params["w"], "b": params["b"] * params["v"]}, batch, rng)


def run(params, data, rounds, mask=MASK, server=None, **executor):
    algorithm = fl.fedavg(loss3, optax.adam(0.05), server, trainable=mask)
    engine = fl.FederatedEngine(algorithm, fl.ExecutorConfig(**executor))
    state = engine.init(params, jax.random.key(3))
    for _ in range(rounds):
        state = engine.run_round(state, data).state
    return state


def test_split_merge_round_trip_and_count():
    p = params3()
    t, f = tr.split(MASK, p)
    assert jax.tree.leaves(t) == [p["b"], p["v"]] and jax.tree.leaves(f) == [p["w"]]
    assert tr.merge(MASK, t, f) == p
    mask = tr.mask_from_predicate(p, lambda path: path[-1] != "w")
    assert mask == MASK
    assert tr.count(MASK, p) == (2 * toy.CLASSES * 4, (toy.DIM + 2) * toy.CLASSES * 4)


@pytest.mark.parametrize("server", [None, "fedadam"])
def test_frozen_leaves_stay_bitwise_and_trainable_ones_move(server):
    p = params3()
    opt = fl.make_server_optimizer(server, 0.1) if server else None
    state = run(p, toy.client_data(3), rounds=2, server=opt)
    np.testing.assert_array_equal(np.asarray(state.params["w"]), np.asarray(p["w"]))
    assert not np.allclose(state.params["b"], p["b"]) and not np.allclose(state.params["v"],
                                                                          p["v"])
    if server:  # the server optimizer holds moments of the trainable leaves only
        shapes = [x.shape for x in jax.tree.leaves(state.opt_state)]
        assert shapes == [(toy.CLASSES,)] * 4


def test_one_client_peft_fedavg_equals_centralised_training():
    """One client, plain FedAvg: each round is S Adam steps on the trainable leaves from the
    server model, replayed here with optax and the engine's keys."""
    p, data = params3(), toy.client_data(1, ragged=False)
    state = run(p, data, rounds=2)
    train, frozen = tr.split(MASK, p)
    rng = jax.random.key(3)
    opt = optax.adam(0.05)
    for r in range(2):
        key, opt_state = client_key(rng, jnp.int32(r), jnp.int32(0)), opt.init(train)
        for t in range(data["mask"].shape[1]):
            batch = {k: v[0, t] for k, v in data.items()}

            def loss(tp, batch=batch, t=t, key=key):
                return loss3(tr.merge(MASK, tp, frozen), batch, jax.random.fold_in(key, t))[0]

            updates, opt_state = opt.update(jax.grad(loss)(train), opt_state, train)
            train = optax.apply_updates(train, updates)
    np.testing.assert_allclose(state.params["b"], train["b"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(state.params["v"], train["v"], rtol=1e-6, atol=1e-7)


def test_peft_executors_agree():
    p, data = params3(), toy.client_data(5)
    ref = run(p, data, rounds=1, backend="loop")
    for ex in ({"backend": "vmap"}, {"backend": "vmap", "clients_per_chunk": 2},
               {"backend": "mesh", "num_devices": 2}):  # frozen leaves replicated
        assert toy.max_abs_diff(run(p, data, rounds=1, **ex).params, ref.params) < 1e-6


def test_client_mask_zeroes_components_of_start_gradient_and_message():
    """Client i keeps only components < i + 1 of v: the rest start, stay and arrive as zero."""
    p, data = params3(), toy.client_data(1, ragged=False)

    def client_mask(train, cid):
        keep = (jnp.arange(toy.CLASSES) <= cid).astype(jnp.float32)
        return {"b": jnp.ones_like(train["b"]), "v": keep, "w": None}

    algorithm = fl.fedavg(loss3, optax.adam(0.05), trainable=MASK, client_mask=client_mask)
    engine = fl.FederatedEngine(algorithm)
    state = engine.init(p, jax.random.key(3))
    v = engine.run_round(state, data, client_ids=np.array([1])).state.params["v"]
    assert float(v[2]) == 0.0 and float(v[0]) != 0.5 and float(v[1]) != 0.5


def _chunk_bytes(frozen_big: bool, k: int) -> int:
    d = 256

    def loss(params, batch, rng):
        h = batch["x"] @ params["big"]
        logits = h[..., : toy.CLASSES] @ params["w"]
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
        return jnp.mean(losses * batch["mask"]), {}

    params = {"big": jax.ShapeDtypeStruct((d, d), jnp.float32),
              "w": jax.ShapeDtypeStruct((toy.CLASSES, toy.CLASSES), jnp.float32)}
    mask = {"big": not frozen_big, "w": True}
    engine = fl.build_engine(loss, optax.adam(0.1), trainable=mask, carry_client_state=True)
    data = {"x": jax.ShapeDtypeStruct((k, 2, 4, d), jnp.float32),
            "y": jax.ShapeDtypeStruct((k, 2, 4), jnp.int32),
            "mask": jax.ShapeDtypeStruct((k, 2, 4), jnp.float32)}
    carried = jax.eval_shape(lambda q: engine.init_client_states(q, k), params)
    carried_bytes = sum(x.size * 4 for x in jax.tree.leaves(carried))
    m = engine.lower_chunk(params, data).compile().memory_analysis()
    compiled = m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes
    return compiled, carried_bytes


def test_compiled_per_client_bytes_scale_with_the_trainable_size():
    full = [_chunk_bytes(False, k) for k in (4, 8)]
    peft = [_chunk_bytes(True, k) for k in (4, 8)]
    per_client_full = (full[1][0] - full[0][0]) / 4
    per_client_peft = (peft[1][0] - peft[0][0]) / 4
    # Full: params, Adam's two moments and a gradient of the 256x256 kernel per client.
    assert per_client_full > 3 * 256 * 256 * 4
    # PEFT: the kernel is one shared copy; a client holds its 3x3 head and the activations.
    assert per_client_peft < 256 * 256 * 4 / 8
    assert peft[1][1] == 8 * 2 * 9 * 4 + 8 * 4  # Adam mu, nu of w, count per client


def test_contextual_aggregator_sees_only_the_trainable_reference():
    """Norm bounding under PEFT bounds the trainable delta: a bound far above every update
    is the plain mean bit for bit, a tiny one keeps the trainable leaves within it of the
    start, and the frozen leaves never move."""
    p, data = params3(), toy.client_data(3)

    def bounded(bound):
        algorithm = fl.fedavg(loss3, optax.adam(0.05), trainable=MASK,
                              aggregator=fl.norm_bound(bound))
        engine = fl.FederatedEngine(algorithm, fl.ExecutorConfig())
        return engine.run_round(engine.init(p, jax.random.key(3)), data).state.params

    loose, plain = bounded(1e6), run(p, data, rounds=1).params
    for k in MASK:
        np.testing.assert_array_equal(np.asarray(loose[k]), np.asarray(plain[k]))
    tight = bounded(1e-3)
    moved = np.sqrt(sum(float(jnp.sum((tight[k] - p[k]) ** 2)) for k in ("b", "v")))
    assert 0 < moved <= 1e-3 * (1 + 1e-5)
    np.testing.assert_array_equal(np.asarray(tight["w"]), np.asarray(p["w"]))


def test_dp_fedavg_under_peft_clips_the_trainable_delta_and_keeps_the_base():
    """DP-FedAvg's delta is taken from the trainable reference: with z = 0 and a clip far
    above every update it is plain PEFT FedAvg (uniform weights: ragged=False gives every
    client the same examples), and the frozen leaves stay bitwise."""
    p, data = params3(), toy.client_data(3, ragged=False)
    base = fl.fedavg(loss3, optax.adam(0.05), trainable=MASK)
    private = fl.dp_fedavg(base, fl.DPConfig(clip=1e6, noise_multiplier=0.0,
                                             expected_clients=3))
    engine = fl.FederatedEngine(private, fl.ExecutorConfig())
    got = engine.run_round(engine.init(p, jax.random.key(3)), data).state.params
    want = run(p, data, rounds=1).params
    for k in MASK:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(got["w"]), np.asarray(p["w"]))
