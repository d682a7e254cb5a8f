"""Many federations in one program: each equals its federation run alone on the engine."""

import jax
import numpy as np
import optax

from fedjax_lm import federated as fl
from fedjax_lm.federated.federations import FederationRound, pad_cohort, stack, unstack
from tests.federated import toy

# (seed, client lr, server lr, clients, local steps): lr, seeds, C and S all differ.
CELLS = [(0, 0.1, 0.5, 3, 3), (1, 0.05, 1.0, 5, 2)]


def _algorithm(lr, server_lr):
    return fl.fedavg(toy.loss_fn, optax.adam(lr), fl.make_server_optimizer("fedavgm", server_lr))


def test_federation_axis_equals_each_federation_alone():
    """Two FedAvgM/Adam federations, three rounds, in one program (one compile) vs each on
    the vmap engine: same params, loss and per-client metrics to float tolerance."""
    program = FederationRound(lambda hp: _algorithm(hp["lr"], hp["server_lr"]),
                              clients_per_chunk=2)
    data = [toy.client_data(c, steps=s, seed=seed) for seed, _, _, c, s in CELLS]
    states = stack([fl.init_state(_algorithm(lr, slr), toy.init_params(seed),
                                  jax.random.key(seed)) for seed, lr, slr, _, _ in CELLS])
    hp = stack([{"lr": np.float32(lr), "server_lr": np.float32(slr)}
                for _, lr, slr, _, _ in CELLS])
    for _ in range(3):
        cohorts = [fl.make_cohort(d) for d in data]
        states, outputs = program(states, cohorts, hp)
    assert len(program._compiled) == 1  # one program for every round
    for (seed, lr, slr, c, _), d, state, out in zip(CELLS, data, unstack(states, len(CELLS)),
                                                    outputs, strict=True):
        engine = fl.FederatedEngine(_algorithm(lr, slr), fl.ExecutorConfig(clients_per_chunk=2))
        alone = engine.init(toy.init_params(seed), jax.random.key(seed))
        for _ in range(3):
            alone, metrics, _ = engine.run_round(alone, d)
        assert int(state.round) == 3
        assert toy.max_abs_diff(state.params, alone.params) <= 1e-6
        assert toy.max_abs_diff(state.opt_state, alone.opt_state) <= 1e-6
        assert abs(float(out.metrics.loss) - float(metrics.loss)) <= 1e-6
        assert out.metrics.client_loss.shape == (c,)
        np.testing.assert_allclose(out.metrics.client_loss, metrics.client_loss, atol=1e-6)
        np.testing.assert_array_equal(out.metrics.client_examples, metrics.client_examples)


def test_padding_a_cohort_adds_zero_weight_clients_and_empty_steps():
    cohort = fl.make_cohort(toy.client_data(2, steps=2))
    padded = pad_cohort(cohort, 4, 3)
    assert padded.data["x"].shape == (4, 3, 4, toy.DIM)
    np.testing.assert_array_equal(padded.weights, [*cohort.weights, 0, 0])
    assert padded.data["mask"][2:].sum() == 0 and padded.data["mask"][:, 2].sum() == 0
    np.testing.assert_array_equal(padded.data["x"][:2, :2], cohort.data["x"])
