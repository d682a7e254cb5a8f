"""Many federations in one program: each equals its federation run alone on the engine."""

import jax
import numpy as np
import optax
import pytest

from fedjax_lm import federated as fl
from fedjax_lm.federated.federations import (
    FederationRound,
    common_leaves,
    join_shared,
    pad_cohort,
    split_shared,
    stack,
    unstack,
)
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


def test_a_shared_frozen_base_enters_once_and_changes_nothing():
    """PEFT federations over one frozen base: with `shared`, the frozen leaf is one argument
    (F - 1 copies fewer, exactly) and every federation's numbers equal the unshared program's."""
    mask = {"w": False, "b": True}  # only the bias trains; `w` is the frozen "base"
    cells = [(0, 0.1, 3), (1, 0.05, 5), (2, 0.2, 4)]
    base = toy.init_params(7)

    def algorithm(lr):
        return fl.fedavg(toy.loss_fn, optax.sgd(lr), fl.make_server_optimizer("fedavg", 1.0),
                         trainable=mask)

    def states():
        return [fl.init_state(algorithm(lr), {"w": base["w"], "b": toy.init_params(seed)["b"]
                                              + seed}, jax.random.key(seed))
                for seed, lr, _ in cells]

    hp = stack([{"lr": np.float32(lr)} for _, lr, _ in cells])
    data = [toy.client_data(c, steps=2, seed=seed) for seed, _, c in cells]
    shared = common_leaves([s.params for s in states()], {"w": True, "b": True})
    assert shared == {"w": True, "b": False}  # the biases differ by seed
    runs = {}
    for name, mask_ in (("plain", None), ("shared", shared)):
        program = FederationRound(lambda h: algorithm(h["lr"]), shared=mask_)
        own, common = split_shared(mask_, states())
        blocks = program.place([fl.make_cohort(d) for d in data])
        runs[name] = program.compile(own, blocks, hp, common).memory_analysis()
        for _ in range(2):
            own, outputs = program(own, [fl.make_cohort(d) for d in data], hp, common=common)
        runs[name] = (runs[name], [join_shared(mask_, s, common) for s in unstack(own, 3)],
                      outputs)
    (plain_mem, plain, plain_out), (shared_mem, joined, shared_out) = runs.values()
    w_bytes = base["w"].size * 4
    assert plain_mem.argument_size_in_bytes - shared_mem.argument_size_in_bytes == 2 * w_bytes
    for a, b, oa, ob in zip(plain, joined, plain_out, shared_out, strict=True):
        np.testing.assert_array_equal(b.params["w"], base["w"])  # the base, bit for bit
        assert toy.max_abs_diff(a.params, b.params) <= 1e-7
        assert abs(float(oa.metrics.loss) - float(ob.metrics.loss)) <= 1e-7
    assert not np.allclose(joined[0].params["b"], states()[0].params["b"])  # it did train


def test_a_shared_program_insists_on_its_common_leaves():
    program = FederationRound(lambda h: _algorithm(0.1, 1.0), shared={"w": True, "b": False})
    own, _ = split_shared(program.shared, [fl.init_state(_algorithm(0.1, 1.0), toy.init_params(),
                                                         jax.random.key(0))] * 2)
    with pytest.raises(ValueError, match="takes the shared leaves as `common`"):
        program(own, [fl.make_cohort(toy.client_data(2))] * 2, stack([{}] * 2))
