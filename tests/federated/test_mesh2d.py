"""A clients × data mesh: 4 clients on 8 devices, each client's batch split over 2 devices."""

import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from fedjax_lm import federated as fl
from tests.federated import toy


def _rounds(data, rounds=2, **config):
    eng = fl.build_engine(toy.loss_fn, optax.adam(0.05), fl.fedadam(0.05), **config)
    state = eng.init(toy.init_params(), jax.random.key(3))
    for _ in range(rounds):
        out = eng.run_round(state, data)
        state = out.state
    return eng, state, out.metrics


def test_data_parallel_mesh_matches_1d_mesh_and_vmap(monkeypatch):
    data = toy.client_data(4)
    _, ref, ref_metrics = _rounds(data, backend="vmap")
    _, one_d, _ = _rounds(data, backend="mesh", num_devices=4)
    placed = []
    device_put = jax.device_put
    monkeypatch.setattr(jax, "device_put", lambda x, s=None, **kw: placed.append(
        out := device_put(x, s, **kw)) or out)
    eng, two_d, metrics = _rounds(data, backend="mesh", data_parallel=2)
    assert eng.mesh.shape == {"clients": 4, "data": 2}
    assert toy.max_abs_diff(two_d.params, ref.params) <= 1e-5
    assert toy.max_abs_diff(two_d.params, jax.device_get(one_d.params)) <= 1e-5
    assert toy.max_abs_diff(two_d.opt_state, ref.opt_state) <= 1e-5
    np.testing.assert_allclose(metrics.client_loss, ref_metrics.client_loss, atol=1e-5)
    # The round's input really is split over both axes: [n=1, K=4, S=3, B=4, D] → one
    # client and half a batch per device.
    blocks = placed[-1]
    x, ids = blocks.data["x"], blocks.client_ids
    assert x.sharding.spec == P(None, "clients", None, "data")
    assert len(x.sharding.device_set) == 8
    assert {s.data.shape for s in x.addressable_shards} == {(1, 1, 3, 2, toy.DIM)}
    assert {s.data.shape for s in ids.addressable_shards} == {(1, 1)}


def test_data_parallel_with_host_chunks_and_padding():
    data = toy.client_data(5)
    _, ref, _ = _rounds(data, backend="vmap")
    _, got, metrics = _rounds(data, backend="mesh", data_parallel=4, clients_per_chunk=2,
                              chunk_executor="host")
    assert toy.max_abs_diff(got.params, ref.params) <= 1e-5
    assert metrics.client_loss.shape == (5,)


def test_data_parallel_errors():
    with pytest.raises(ValueError, match="needs backend='mesh'"):
        fl.EngineConfig(backend="vmap", data_parallel=2)
    with pytest.raises(ValueError, match="must divide the number of devices"):
        fl.build_engine(toy.loss_fn, optax.sgd(0.1), backend="mesh", data_parallel=3)
    eng = fl.build_engine(toy.loss_fn, optax.sgd(0.1), backend="mesh", data_parallel=8)
    state = eng.init(toy.init_params(), jax.random.key(0))
    with pytest.raises(ValueError, match="multiple of data_parallel=8"):
        eng.run_round(state, toy.client_data(2))  # B = 4
