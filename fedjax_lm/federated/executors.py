"""Executors: where the client axis lives. Chosen once; they never change the math.

- `loop`: a Python loop over clients, one compiled client program (the reference);
- `vmap`: every client of the cohort in one compiled program on one device, optionally in
  fixed-width chunks (`clients_per_chunk`) run by a `lax.scan` inside the program (`scan`) or
  dispatched one compiled chunk step at a time from the host (`host`: one executable serves
  every cohort size);
- `mesh`: `vmap` with the client axis sharded over a `clients` (× `data`) device mesh; with
  `feed_round` each process of a multi-host mesh feeds only its own clients;
- `pmap`: `pmap` over devices with `vmap` inside, chunk sums `psum`-ed.

`vmap` / `mesh` with the scan executor are pure (`RoundProgram.pure`): their `__call__` can be
jitted, `lax.scan`-ned over rounds or called inside a user's own program.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from fedjax_lm.federated import placement
from fedjax_lm.federated import round as rnd
from fedjax_lm.federated.aggregate import Aggregator, normalize_weights
from fedjax_lm.federated.algorithm import Algorithm
from fedjax_lm.federated.placement import CLIENT_AXIS
from fedjax_lm.federated.state import Cohort, RoundOutputs, ServerState
from fedjax_lm.federated.tree import tree_stack

BACKENDS = ("loop", "vmap", "mesh", "pmap")
CHUNK_EXECUTORS = ("scan", "host")


class UnsupportedError(ValueError):
    """An algorithm asked of an executor that cannot run it (one line: cause and fix)."""


@dataclasses.dataclass(frozen=True)
class ExecutorConfig:
    """How a round is executed; validated here, once. Nothing here changes the math."""

    backend: str = "vmap"
    clients_per_chunk: int | None = None
    chunk_executor: str = "scan"
    num_devices: int | None = None  # mesh / pmap: use the first N devices (default: all)
    data_parallel: int = 1  # mesh: split each client's batch over this many devices
    donate: bool = True  # donate server-state buffers to the round

    def __post_init__(self):
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(msg)

        need(self.backend in BACKENDS,
             f"unknown backend {self.backend!r}; choose one of {BACKENDS}")
        need(self.chunk_executor in CHUNK_EXECUTORS,
             f"unknown chunk_executor {self.chunk_executor!r}; choose one of {CHUNK_EXECUTORS}")
        need(self.clients_per_chunk is None or self.clients_per_chunk >= 1,
             f"clients_per_chunk must be >= 1, got {self.clients_per_chunk}")
        need(self.clients_per_chunk is None or self.backend != "pmap",
             "clients_per_chunk is not supported by the pmap backend; use backend='mesh'")
        need(self.num_devices is None or self.num_devices >= 1,
             f"num_devices must be >= 1, got {self.num_devices}")
        need(self.data_parallel >= 1, f"data_parallel must be >= 1, got {self.data_parallel}")
        need(self.data_parallel == 1 or self.backend == "mesh",
             "data_parallel > 1 needs backend='mesh' (a clients × data mesh)")

    @property
    def host_chunks(self) -> bool:
        """One compiled chunk step dispatched per chunk (reused for every cohort size)."""
        return (self.chunk_executor == "host" and self.clients_per_chunk is not None
                and self.backend in ("vmap", "mesh"))

    def check_aggregator(self, aggregator: Aggregator) -> None:
        """Refuse an aggregator this executor cannot run, before anything compiles."""
        if not aggregator.decomposable and (
                self.clients_per_chunk is not None or self.backend == "pmap"):
            how = ("the pmap backend" if self.backend == "pmap"
                   else f"clients_per_chunk={self.clients_per_chunk}")
            raise UnsupportedError(
                f"aggregator {aggregator.name!r} needs every client's message at once and "
                f"cannot run in chunks ({how}); unset clients_per_chunk or use backend "
                "vmap/mesh/loop")

    def make_mesh(self) -> Mesh | None:
        if self.backend not in ("mesh", "pmap"):
            return None
        devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
        if self.num_devices is not None:
            if self.num_devices > len(devices):
                raise ValueError(
                    f"num_devices={self.num_devices} but only {len(devices)} devices exist")
            devices = devices[: self.num_devices]
        if self.backend == "pmap":
            return Mesh(np.array(devices), (CLIENT_AXIS,))
        return placement.make_client_mesh(devices, self.data_parallel)


class RoundProgram:
    """`program(state, cohort) -> (state, RoundOutputs)` for one algorithm on one executor."""

    pure = False  # True where `__call__` traces: jit it, scan it, call it in your program

    def __init__(self, algorithm: Algorithm, config: ExecutorConfig, mesh: Mesh | None):
        config.check_aggregator(algorithm.aggregator)
        self.algorithm, self.config, self.mesh = algorithm, config, mesh
        self._donate = (0,) if config.donate else ()
        self._finish = jax.jit(functools.partial(rnd.finish, algorithm),
                               donate_argnums=self._donate)

    def _jitted(self) -> dict[str, object]:
        return {"finish": self._finish}

    def executables(self) -> dict[str, int]:
        """How many executables each jitted program of this round holds (the public way to
        check that rounds do not recompile; `pmap`'s program does not say, so it is absent)."""
        counts = {name: getattr(fn, "_cache_size", None) for name, fn in self._jitted().items()}
        return {name: count() for name, count in counts.items() if count is not None}

    def chunk_step(self, state: ServerState, sums: rnd.RoundSums, block: Cohort,
                   keep_messages: bool = False):
        """Train one `[K, ...]` block and add it to the sums (per-client metrics come back
        replicated on a mesh, so every process can read them; carried states stay sharded)."""
        on_mesh = self.config.backend == "mesh"
        sums, outs = rnd.train_block(self.algorithm, CLIENT_AXIS if on_mesh else None,
                                     keep_messages, state, sums, block)
        if on_mesh:
            outs = outs._replace(metrics=jax.lax.with_sharding_constraint(
                outs.metrics, NamedSharding(self.mesh, P())))
        return sums, outs

    def layout(self, num_clients: int) -> tuple[int, int]:
        """(block width K, padded C)."""
        return placement.layout(num_clients, self.config.clients_per_chunk,
                                placement.client_shards(self.mesh),
                                fixed_width=self.config.host_chunks)


class SequentialRound(RoundProgram):
    """The reference: one compiled single-client program called in a Python loop."""

    def __init__(self, algorithm, config, mesh):
        super().__init__(algorithm, config, mesh)
        keep = not algorithm.aggregator.decomposable
        self._client = jax.jit(functools.partial(rnd.train_block, algorithm, None, keep),
                               donate_argnums=(1,))

    def _jitted(self):
        return {**super()._jitted(), "client": self._client}

    def __call__(self, state: ServerState, cohort: Cohort) -> tuple[ServerState, RoundOutputs]:
        p = cohort.replace(weights=normalize_weights(cohort.weights))
        sums = rnd.zero_sums(self.algorithm, state)
        outs = []
        for i in range(len(cohort.client_ids)):
            sums, out = self._client(state, sums, jax.tree.map(lambda x, i=i: x[i:i + 1], p))
            outs.append(out)
        flat = jax.tree.map(lambda *xs: jnp.concatenate(xs), *outs)
        state, loss, norm = self._finish(state, sums, flat.messages, flat.weights,
                                         flat.client_ids)
        return state, rnd.round_outputs(loss, norm, flat.metrics, flat.client_states)


class BlockRound(RoundProgram):
    """`vmap` / `mesh`: the cohort as `[n, K, ...]` blocks placed by the host."""

    def place_blocks(self, cohort: Cohort) -> Cohort:
        """Host side: pad, reshape to blocks and put them on the mesh."""
        width, padded = self.layout(len(cohort.client_ids))
        blocks = rnd.to_blocks(cohort, width, padded)
        if self.mesh is not None:
            check_batch(self.mesh, cohort.data["mask"].shape[2])
            blocks = jax.device_put(blocks, placement.block_shardings(self.mesh, blocks))
        return blocks

    def __call__(self, state: ServerState, cohort: Cohort) -> tuple[ServerState, RoundOutputs]:
        state, loss, norm, outs = self.run_blocks(state, self.place_blocks(cohort))
        return state, rnd.round_outputs(loss, norm, *rnd.unblock(outs, len(cohort.client_ids)))


class ScanRound(BlockRound):
    """The whole round, chunks included, as one compiled program. Pure: `program(state,
    cohort)` traces too (padding and placement become jnp ops), so it can be jitted,
    `lax.scan`-ned over rounds or called inside a user's own program."""

    pure = True

    def __init__(self, algorithm, config, mesh):
        super().__init__(algorithm, config, mesh)
        self.run_blocks = jax.jit(self._blocks_round, donate_argnums=self._donate)

    def _jitted(self):
        return {"round": self.run_blocks}

    def _blocks_round(self, state, blocks):
        keep = not self.algorithm.aggregator.decomposable
        step = functools.partial(self.chunk_step, keep_messages=keep)
        return rnd.blocks_round(self.algorithm, step, state, blocks)


class HostChunkRound(BlockRound):
    """One compiled chunk step dispatched per chunk: the same executable for every C."""

    def __init__(self, algorithm, config, mesh):
        super().__init__(algorithm, config, mesh)
        self._chunk = jax.jit(self.chunk_step, donate_argnums=(1,))
        self._normalize = jax.jit(normalize_weights)
        replicated = None if mesh is None else NamedSharding(mesh, P())
        self._zeros = jax.jit(functools.partial(rnd.zero_sums, algorithm),
                              out_shardings=replicated)

    def _jitted(self):
        return {**super()._jitted(), "chunk": self._chunk}

    def run_blocks(self, state, blocks):
        blocks = blocks.replace(weights=self._normalize(blocks.weights))
        sums = self._zeros(state)
        outs = []
        for i in range(blocks.client_ids.shape[0]):
            sums, out = self._chunk(state, sums, jax.tree.map(lambda x, i=i: x[i], blocks))
            outs.append(out)
        state, loss, norm = self._finish(state, sums)
        return state, loss, norm, tree_stack(outs)


class PmapRound(RoundProgram):
    """`pmap` over devices, `vmap` inside; the chunk sums are `psum`-ed before the server
    update, which every device computes identically."""

    def __init__(self, algorithm, config, mesh):
        super().__init__(algorithm, config, mesh)
        self._round = jax.pmap(self._device_round, axis_name=CLIENT_AXIS, in_axes=(None, 0),
                               devices=list(mesh.devices.flat))

    def _jitted(self):
        return {"round": self._round}

    def _device_round(self, state, blocks):
        sums, outs = rnd.scan_blocks(self.chunk_step, state, rnd.zero_sums(self.algorithm, state),
                                     blocks)
        state, loss, norm = rnd.finish(self.algorithm, state, jax.lax.psum(sums, CLIENT_AXIS))
        return state, loss, norm, outs

    def __call__(self, state: ServerState, cohort: Cohort) -> tuple[ServerState, RoundOutputs]:
        num_clients, d = len(cohort.client_ids), self.mesh.size
        padded = placement.round_up(num_clients, d)
        p = cohort.replace(weights=normalize_weights(cohort.weights))
        blocks = jax.tree.map(
            lambda x: rnd.pad_axis0(x, padded).reshape((d, 1, padded // d) + x.shape[1:]), p)
        state_r, loss, norm, outs = self._round(state, blocks)
        # One replica, placed exactly like `init`'s state, so the next round hits the cache.
        first = self.mesh.devices.flat[0]
        state, loss, norm = jax.tree.map(lambda x: jax.device_put(x[0], first),
                                         (state_r, loss, norm))
        outs = jax.tree.map(lambda x: x.reshape((1, padded) + x.shape[3:]), outs)
        return state, rnd.round_outputs(loss, norm, *rnd.unblock(outs, num_clients))


def check_batch(mesh: Mesh, batch_size: int) -> None:
    dp = mesh.shape.get(placement.DATA_AXIS, 1)
    if batch_size % dp:
        raise ValueError(
            f"batch size {batch_size} must be a multiple of data_parallel={dp}: each "
            "client's batch is split evenly over the `data` mesh axis")


def make_round(algorithm: Algorithm, config: ExecutorConfig | None = None,
               mesh: Mesh | None = None) -> RoundProgram:
    """`program = make_round(algorithm, executor)`; `state, outputs = program(state, cohort)`."""
    config = config or ExecutorConfig()
    mesh = mesh if mesh is not None else config.make_mesh()
    if config.backend == "loop":
        return SequentialRound(algorithm, config, mesh)
    if config.backend == "pmap":
        return PmapRound(algorithm, config, mesh)
    if config.host_chunks:
        return HostChunkRound(algorithm, config, mesh)
    return ScanRound(algorithm, config, mesh)
