"""Worker for test_multihost: run under `fedjax_lm.scale.launch` (2 processes × 2 CPU devices).

Every process feeds only its own clients (`run_round_local`) for 3 rounds of the toy problem
with 6-of-10 partial participation; process 0 writes the server params to `argv[1]` (.npz).
The same rounds through `run_round` with the whole cohort on every process are written too.
"""

import sys

import jax
import numpy as np
import optax

from fedjax_lm import federated as fl
from fedjax_lm.scale.distributed import is_primary, maybe_initialize_distributed
from tests.federated import toy

POPULATION, COHORT, ROUNDS, CHUNK = 10, 6, 3, 4


def engine():
    return fl.build_engine(toy.loss_fn, optax.adam(0.05), fl.fedadam(0.05), backend="mesh",
                           clients_per_chunk=CHUNK)


def main(out_path: str) -> None:
    assert jax.process_count() == 2 and jax.device_count() == 4, jax.devices()
    population = toy.client_data(POPULATION)
    eng = engine()
    results = {}
    for mode in ("local", "global"):
        state = eng.init(toy.init_params(), jax.random.key(7))
        for r in range(ROUNDS):
            ids = fl.sample_clients(fl.sampling_key(state.rng, r), POPULATION, COHORT)
            if mode == "local":
                pos = eng.process_client_ids(COHORT)
                mine = ids[pos[pos < COHORT]]  # the only clients this process loads
                local = {k: np.zeros((len(pos),) + v.shape[1:], v.dtype)
                         for k, v in population.items()}
                for k, v in population.items():
                    local[k][: len(mine)] = v[mine]
                out = eng.run_round_local(state, local, num_clients=COHORT, client_ids=ids)
            else:
                cohort = {k: v[ids] for k, v in population.items()}
                out = eng.run_round(state, cohort, client_ids=ids)
            state = out.state
        results[f"{mode}_w"] = np.asarray(state.params["w"])
        results[f"{mode}_b"] = np.asarray(state.params["b"])
        results[f"{mode}_client_loss"] = np.asarray(out.metrics.client_loss)
        results[f"{mode}_round"] = np.asarray(state.round)
    results["positions"] = np.asarray(eng.process_client_ids(COHORT))
    if is_primary():
        np.savez(out_path, **results)


if __name__ == "__main__":
    # Before anything touches a device (importing jax does not).
    assert maybe_initialize_distributed(), "expected the launcher's FEDJAX_LM_* environment"
    main(sys.argv[1])
