"""Memory planning: compiled estimates are affine in chunk width and pick a fitting width."""

import argparse

import jax
import jax.numpy as jnp
import optax
import pytest

from fedjax_lm.scale import memory as mem
from fedjax_lm.scale import plan

D, H, OUT = 128, 256, 10
PARAMS = {"w1": jax.ShapeDtypeStruct((D, H), jnp.float32),
          "b1": jax.ShapeDtypeStruct((H,), jnp.float32),
          "w2": jax.ShapeDtypeStruct((H, OUT), jnp.float32)}
BATCH = mem.BatchSpec(2, 4, {"x": ((D,), "float32"), "y": ((), "int32")})


def mlp_loss(params, batch, rng):
    h = jax.nn.relu(batch["x"] @ params["w1"] + params["b1"])
    losses = optax.softmax_cross_entropy_with_integer_labels(h @ params["w2"], batch["y"])
    return jnp.sum(losses * batch["mask"]) / jnp.maximum(batch["mask"].sum(), 1.0), {}


@pytest.fixture(scope="module")
def sgd_estimate():
    return mem.estimate_memory(mlp_loss, PARAMS, optax.sgd(0.1), BATCH)


def test_estimate_is_linear_in_chunk_width(sgd_estimate):
    est = sgd_estimate
    compiled8 = mem.compiled_chunk_bytes(mlp_loss, PARAMS, optax.sgd(0.1), BATCH, 8)
    assert abs(est.chunk_bytes(8) - compiled8) <= 0.02 * compiled8
    assert est.chunk_bytes(8) - est.chunk_bytes(4) == 4 * est.per_client_bytes > 0
    assert est.data_bytes_per_client == 2 * 4 * (D * 4 + 4 + 4)  # x, y, mask


def test_bytes_per_client_is_params_times_states(sgd_estimate):
    p = sgd_estimate.params_bytes
    assert p == 4 * (D * H + H + H * OUT)
    adam = mem.estimate_memory(mlp_loss, PARAMS, optax.adam(0.1), BATCH)
    # Analytic: params + optimizer states (SGD none, Adam two moments + a count) + delta.
    assert sgd_estimate.client_state_bytes == p * (1 + 0 + 1)
    assert abs(adam.client_state_bytes - p * (1 + 2 + 1)) <= 16
    # Compiled marginal cost: that state plus gradients, update temporaries, activations.
    for est in (sgd_estimate, adam):
        assert 1.0 <= est.per_client_bytes / est.client_state_bytes <= 1.6


def test_chosen_width_fits_and_the_next_wider_does_not(sgd_estimate, monkeypatch):
    est, clients = sgd_estimate, 12
    assert mem.candidate_widths(clients) == [12, 8, 6, 4, 3, 2, 1]
    budget = (est.round_bytes(clients, 4) + est.round_bytes(clients, 6)) // 2
    width = mem.choose_chunk_width(mlp_loss, PARAMS, optax.sgd(0.1), BATCH, clients, budget,
                                   headroom=1.0)
    assert width == 4
    assert est.round_bytes(clients, width) <= budget < est.round_bytes(clients, 6)
    assert mem.widest_fitting(est, 12, est.chunk_bytes(1) - 1) is None
    monkeypatch.setattr(mem, "estimate_memory", lambda *a, **k: est)  # no recompile
    with pytest.raises(ValueError, match="one client needs"):
        mem.choose_chunk_width(mlp_loss, PARAMS, optax.sgd(0.1), BATCH, 12, 1000)
    assert est.max_clients(est.chunk_bytes(5)) == 5


def test_parse_bytes():
    assert mem.parse_bytes("80GB") == 80 * 10**9
    assert mem.parse_bytes("16 GiB") == 16 * 2**30
    assert mem.parse_bytes("1e6") == 10**6
    with pytest.raises(ValueError, match="memory size"):
        mem.parse_bytes("lots")


def test_plan_resolves_model_presets_lazily():
    pytest.importorskip("fedjax_lm.models")
    _, params = plan.model_loss_and_params("base", "bert", 2, remat=False, bf16=False)
    n = sum(x.size for x in jax.tree.leaves(params))
    assert 109e6 < n < 110e6  # BERT-base with a 2-label head, from shapes only


def test_plan_command(capsys, monkeypatch, sgd_estimate):
    # The command's plumbing, on the MLP (compiling a BERT here would be slow).
    monkeypatch.setattr(plan, "model_loss_and_params", lambda *a, **k: (mlp_loss, PARAMS))
    monkeypatch.setattr(mem, "estimate_memory", lambda *a, **k: sgd_estimate)
    parser = argparse.ArgumentParser()
    plan.add_plan_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["plan", "--model", "tiny", "--clients", "8", "--batch-size", "4",
                              "--max-length", "16", "--local-steps", "1", "--optimizer", "sgd",
                              "--device-memory", "1GiB"])
    assert plan.run_plan(args) == 0
    out = capsys.readouterr().out
    assert "clients_per_chunk: 8 (8 per device)" in out and "tiny (bert)" in out
