"""The thin host driver around a round program: state placement, cohorts, process-local
feeding, compile counts. The math lives in the algorithm's hooks (`algorithm`, `fedavg`,
`scaffold`) and the round (`round`); where clients run lives in `executors`.

    engine = FederatedEngine(fedavg(loss_fn, optax.sgd(0.1)), ExecutorConfig(backend="mesh"))
    state = engine.init(params, jax.random.key(0))
    state, metrics, _ = engine.run_round(state, data)       # data leaves [C, S, B, ...]
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Sharding

from fedjax_lm.federated import placement
from fedjax_lm.federated import round as rnd
from fedjax_lm.federated.algorithm import Algorithm, LossFn, init_state
from fedjax_lm.federated.cohort import check_data, client_weights, cohort_ids, make_cohort
from fedjax_lm.federated.executors import (
    BlockRound,
    ExecutorConfig,
    UnsupportedError,
    check_batch,
    make_round,
)
from fedjax_lm.federated.fedavg import fedavg
from fedjax_lm.federated.server import ServerOptimizer
from fedjax_lm.federated.state import Cohort, Params, PyTree, RoundResult, ServerState
from fedjax_lm.federated.store import ClientStateStore

EngineConfig = ExecutorConfig  # the name the first engine used


class FederatedEngine:
    """Runs rounds of one algorithm on one executor. Build it once: the executor's programs
    are compiled on first use and reused, so rounds with the same shapes never recompile."""

    def __init__(self, algorithm: Algorithm, executor: ExecutorConfig | None = None, *,
                 weighting: str = "examples"):
        self.algorithm = algorithm
        self.config = executor or ExecutorConfig()
        client_weights(np.zeros((1, 1, 1)), weighting)  # validates the name
        self.weighting = weighting
        self.mesh = self.config.make_mesh()
        self.program = make_round(algorithm, self.config, self.mesh)

    @property
    def num_devices(self) -> int:
        return 1 if self.mesh is None else self.mesh.size

    @property
    def num_client_shards(self) -> int:
        """How many ways the client axis is split (devices / data_parallel)."""
        return placement.client_shards(self.mesh)

    def compiled_executables(self) -> dict[str, int]:
        """Executables held by each compiled program of the round (rounds that reuse their
        program add none)."""
        return self.program.executables()

    # -- state ---------------------------------------------------------------------------

    def init(self, params: Params, rng: jax.Array | int) -> ServerState:
        """The round-0 server state (replicated over the mesh for the mesh backend)."""
        state = init_state(self.algorithm, params, jnp.asarray(rng))
        # Own copies: the round donates the state's buffers, never the caller's params.
        state = jax.tree.map(lambda x: jnp.array(x, copy=True), state)
        if self.config.backend == "mesh":
            state = placement.replicate(state, self.mesh)
        elif self.config.backend == "pmap":
            # Committed to the first device, like the state a pmap round returns: otherwise
            # round 2 sees a differently placed input and compiles again.
            state = jax.device_put(state, self.mesh.devices.flat[0])
        return state

    def _need_stateful(self) -> None:
        if not self.algorithm.stateful:
            raise ValueError(f"algorithm {self.algorithm.name!r} carries no client state")

    def init_client_states(self, params: Params, num_clients: int) -> PyTree:
        """Fresh carried client states stacked on axis 0 (device arrays)."""
        self._need_stateful()
        one = self.algorithm.client_state_init(params)
        return jax.tree.map(lambda x: jnp.broadcast_to(x, (num_clients,) + x.shape), one)

    def new_store(self, params: Params, population_size: int) -> ClientStateStore:
        """A host store of every population client's carried state."""
        self._need_stateful()
        return ClientStateStore.create(self.algorithm.client_state_init, params,
                                       population_size)

    # -- the round -----------------------------------------------------------------------

    def run_round(
        self, state: ServerState, data: dict[str, Any], *, client_ids: Any = None,
        weights: Any = None, client_states: PyTree | None = None,
    ) -> RoundResult:
        """One round over the cohort in `data` (leaves `[C, S, B, ...]`).

        `client_ids` are population ids (they pick each client's key; default `0..C-1`);
        `weights` override the engine's weighting; `client_states` (`[C, ...]`) is required
        iff the algorithm is stateful. In a multi-process run every process passes the whole
        cohort; `run_round_local` lets each pass only its own clients.
        """
        cohort = make_cohort(data, client_ids, weights, weighting=self.weighting,
                             client_states=client_states)
        return self.run_cohort(state, cohort)

    def run_cohort(self, state: ServerState, cohort: Cohort) -> RoundResult:
        if self.algorithm.stateful != (cohort.client_states is not None):
            raise ValueError(
                f"client_states must be given exactly when the algorithm carries client state "
                f"({self.algorithm.name!r} {'does' if self.algorithm.stateful else 'does not'})")
        state, outputs = self.program(state, cohort)
        return RoundResult(state, outputs.metrics, outputs.client_states)

    def run_round_with_store(self, state: ServerState, store: ClientStateStore,
                             data: dict[str, Any], client_ids: Any,
                             weights: Any = None) -> RoundResult:
        """`run_round` for a stateful algorithm: gather the cohort's rows from `store`, run,
        write the new rows back."""
        ids = np.asarray(client_ids)
        result = self.run_round(state, data, client_ids=ids, weights=weights,
                                client_states=store.gather(ids))
        store.scatter(ids, result.client_states)
        return result

    # -- multi-host ------------------------------------------------------------------------

    def process_client_ids(self, num_clients: int, process_index: int | None = None) -> np.ndarray:
        """Positions in the (padded) cohort this process feeds to `run_round_local`, in order;
        positions `>= num_clients` are padding and come last (see `placement`)."""
        if self.config.backend != "mesh":
            raise ValueError("process-local client data needs backend='mesh'")
        processes = sorted({d.process_index for d in self.mesh.devices.flat})
        if processes != list(range(len(processes))):
            raise ValueError(f"the mesh must span processes 0..n-1, it spans {processes}")
        return placement.process_client_ids(
            num_clients, num_client_shards=self.num_client_shards,
            clients_per_chunk=self.config.clients_per_chunk, num_processes=len(processes),
            process_index=jax.process_index() if process_index is None else process_index,
            fixed_width=self.config.host_chunks,
        )

    def run_round_local(
        self, state: ServerState, local_data: dict[str, Any], *, num_clients: int,
        client_ids: Any = None, weights: Any = None,
    ) -> RoundResult:
        """`run_round` where this process passes only its own clients (multi-host runs).

        `local_data` holds, stacked in order, the cohort positions
        `process_client_ids(num_clients)` (host arrays, leaves `[C_local, S, B, ...]`;
        padding positions all zeros). `client_ids` / `weights` are for the whole cohort
        (`[num_clients]`, known to every process). Same numbers as `run_round`.
        """
        if self.algorithm.stateful:
            raise UnsupportedError(
                f"algorithm {self.algorithm.name!r} carries client state, which process-local "
                "feeding cannot carry; run it with run_round and the whole cohort")
        positions = self.process_client_ids(num_clients)
        local_data = jax.tree.map(np.asarray, local_data)
        mask = check_data(local_data)
        if mask.shape[0] != len(positions):
            raise ValueError(
                f"this process feeds {len(positions)} clients (positions {positions.tolist()}),"
                f" got local data for {mask.shape[0]}")
        check_batch(self.mesh, mask.shape[2])
        program: BlockRound = self.program
        width, padded = program.layout(num_clients)
        ids = rnd.pad_axis0(cohort_ids(client_ids, num_clients), padded)[positions]
        if weights is None:
            w = client_weights(mask, self.weighting)
        else:
            w = rnd.pad_axis0(np.asarray(weights, np.float32), padded)[positions]
        n = padded // width
        local = Cohort(*jax.tree.map(lambda x: x.reshape((n, len(positions) // n) + x.shape[1:]),
                                     (local_data, ids, w)))
        blocks = jax.tree.map(
            lambda x, sh: jax.make_array_from_process_local_data(sh, x, (n, width) + x.shape[2:]),
            local, placement.block_shardings(self.mesh, local))
        state, loss, norm, outs = program.run_blocks(state, blocks)
        outputs = rnd.round_outputs(loss, norm, *rnd.unblock(outs, num_clients))
        return RoundResult(state, outputs.metrics, None)

    # -- planning --------------------------------------------------------------------------

    def lower_chunk(self, params: Params, chunk_data: dict[str, Any], *,
                    sharding: Sharding | None = None) -> jax.stages.Lowered:
        """Lower, without running or allocating, the program that trains one chunk of K
        clients (`chunk_data` leaves `[K, S, B, ...]`). `params` and `chunk_data` may be
        `jax.ShapeDtypeStruct`s: memory planning reads the compiled memory analysis.
        `sharding` places every input, e.g. on a compile-only device (`scale.targets`)."""
        k = chunk_data["mask"].shape[0]
        state = jax.eval_shape(lambda p: self.init(p, jax.random.key(0)), params)
        sums = jax.eval_shape(lambda s: rnd.zero_sums(self.algorithm, s), state)
        cs = None
        if self.algorithm.stateful:
            cs = jax.eval_shape(lambda p: self.init_client_states(p, k), params)
        block = Cohort(chunk_data, jax.ShapeDtypeStruct((k,), jnp.int32),
                       jax.ShapeDtypeStruct((k,), jnp.float32), cs)
        args = (state, sums, block)
        if sharding is not None:
            args = jax.tree.map(
                lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), args)
        return jax.jit(self.program.chunk_step, donate_argnums=(1,)).lower(*args)


def build_engine(
    loss_fn: LossFn,
    client_optimizer: optax.GradientTransformation,
    server_optimizer: ServerOptimizer = None,
    *,
    prox_mu: float = 0.0,
    carry_client_state: bool = False,
    weighting: str = "examples",
    trainable: PyTree | None = None,
    **executor: Any,
) -> FederatedEngine:
    """FedAvg-family shorthand: `build_engine(loss_fn, optax.sgd(0.1), backend="mesh")`;
    `trainable` (a bool mask over the params) keeps only those leaves per client (PEFT)."""
    algorithm = fedavg(loss_fn, client_optimizer, server_optimizer, prox_mu=prox_mu,
                       carry_optimizer_state=carry_client_state, trainable=trainable)
    return FederatedEngine(algorithm, ExecutorConfig(**executor), weighting=weighting)
