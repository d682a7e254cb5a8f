"""The federated round: broadcast → vmap(scan(local steps)) → weighted mean → server optimizer.

Clients are a leading array axis. A round's client data is a pytree whose leaves are
`[C, S, B, ...]` with an example mask `data["mask"]` of shape `[C, S, B]`. Backends only
change where that axis lives; the arithmetic is the same everywhere:

- `loop`: a Python loop over clients calling one jitted single-client step (the reference
  and the baseline every speed-up is measured against);
- `vmap`: all clients in one jitted program on one device;
- `mesh`: the same program with the client axis sharded over the `clients` axis of a
  `jax.sharding.Mesh` (C is padded with zero-weight clients to a multiple of the device
  count); with `data_parallel=d` the mesh is `clients × data` and each client's batch is
  split over `d` devices. The mesh may span processes (`run_round_local`: every process
  feeds only its own clients);
- `pmap`: the legacy API, kept for comparison.

With `clients_per_chunk=K` the clients run in chunks of fixed vmap width K (C padded to a
multiple of K with zero-weight clients), so peak activation memory is one chunk's. The
`scan` chunk executor keeps the whole round one jitted program (a `lax.scan` over
chunks); the `host` executor dispatches one jitted chunk step per chunk, so the compiled
client step is the same executable for every C that is a multiple of K.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, Sharding
from jax.sharding import PartitionSpec as P

from fedjax_lm.federated import aggregate as agg
from fedjax_lm.federated import placement
from fedjax_lm.federated.client import LossFn, make_client_update
from fedjax_lm.federated.placement import CLIENT_AXIS, round_up
from fedjax_lm.federated.sampling import client_key
from fedjax_lm.federated.server import ServerOptimizer
from fedjax_lm.federated.state import (
    ClientResult,
    Params,
    PyTree,
    RoundMetrics,
    RoundResult,
    ServerState,
)

BACKENDS = ("loop", "vmap", "mesh", "pmap")
CHUNK_EXECUTORS = ("scan", "host")
WEIGHTINGS = ("examples", "uniform")


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """How a round is executed. Nothing here changes the math, except `weighting`."""

    backend: str = "vmap"
    clients_per_chunk: int | None = None
    chunk_executor: str = "scan"
    weighting: str = "examples"  # client weight = its real examples, or 1 per client with data
    carry_client_state: bool = False  # keep each client's optimizer state across rounds
    num_devices: int | None = None  # mesh / pmap: use the first N devices (default: all)
    donate: bool = True  # donate server-state buffers to the round
    data_parallel: int = 1  # mesh: split each client's batch over this many devices

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; choose one of {BACKENDS}")
        if self.chunk_executor not in CHUNK_EXECUTORS:
            raise ValueError(
                f"unknown chunk_executor {self.chunk_executor!r}; choose one of {CHUNK_EXECUTORS}"
            )
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"unknown weighting {self.weighting!r}; choose one of {WEIGHTINGS}")
        if self.clients_per_chunk is not None and self.clients_per_chunk < 1:
            raise ValueError(f"clients_per_chunk must be >= 1, got {self.clients_per_chunk}")
        if self.clients_per_chunk is not None and self.backend == "pmap":
            raise ValueError("clients_per_chunk is not supported by the legacy pmap backend; "
                             "use backend='mesh'")
        if self.num_devices is not None and self.num_devices < 1:
            raise ValueError(f"num_devices must be >= 1, got {self.num_devices}")
        if self.data_parallel < 1:
            raise ValueError(f"data_parallel must be >= 1, got {self.data_parallel}")
        if self.data_parallel > 1 and self.backend != "mesh":
            raise ValueError("data_parallel > 1 needs backend='mesh' (a clients × data mesh)")


# ----------------------------------------------------------------------------- pure pieces


def _client_weights(mask: jax.Array | np.ndarray, weighting: str) -> np.ndarray | jax.Array:
    xp = np if isinstance(mask, np.ndarray) else jnp
    examples = xp.sum(mask.reshape(mask.shape[0], -1).astype(xp.float32), axis=1)
    if weighting == "uniform":
        return (examples > 0).astype(xp.float32)
    return examples


def _process_clients(
    client_update,
    carry_state: bool,
    spmd_axis_name: str | None,
    state: ServerState,
    acc: agg.Accumulator,
    block: tuple,
):
    """Train a block of K clients (vmapped) and add them to the accumulator."""
    data, ids, p, client_states = block
    keys = jax.vmap(client_key, in_axes=(None, None, 0))(state.rng, state.round, ids)
    results: ClientResult = jax.vmap(
        client_update,
        in_axes=(None, 0 if carry_state else None, 0, 0),
        spmd_axis_name=spmd_axis_name,
    )(state.params, client_states if carry_state else None, data, keys)
    finite = jax.vmap(agg.is_finite)(results.params)
    acc = agg.accumulate(acc, results, p, finite)
    norms = jax.vmap(agg.client_update_norm, in_axes=(0, None))(results.params, state.params)
    per_client = (results.loss, results.num_examples, norms, finite)
    return acc, (per_client, results.opt_state if carry_state else None)


def _server_step(server_optimizer: ServerOptimizer, state: ServerState, acc: agg.Accumulator):
    """Mean client model → server optimizer → next state (round + 1)."""
    mean = agg.weighted_mean(acc, state.params)
    if server_optimizer is None:
        params, opt_state = mean, state.opt_state
    else:
        pseudo_grad = jax.tree.map(lambda s, m: s - m, state.params, mean)  # = −Δ
        updates, opt_state = server_optimizer.update(pseudo_grad, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
    update_norm = agg.client_update_norm(params, state.params)
    loss = acc.loss / jnp.maximum(acc.examples, 1.0)
    new_state = state.replace(params=params, opt_state=opt_state, round=state.round + 1)
    return new_state, loss, update_norm


def _run_blocks(process, state, blocks):
    """Run `process` over leading-axis blocks: directly when there is one, else lax.scan."""
    acc = agg.zeros_accumulator(state.params)
    if jax.tree.leaves(blocks)[0].shape[0] == 1:
        acc, outs = process(state, acc, jax.tree.map(lambda x: x[0], blocks))
        return acc, jax.tree.map(lambda x: x[None], outs)
    return jax.lax.scan(functools.partial(process, state), acc, blocks)


# ----------------------------------------------------------------------------- the engine


class FederatedEngine:
    """Runs federated rounds of one algorithm (loss, client optimizer, server optimizer).

    Build it once: each backend's jitted functions are created here, so repeated rounds
    with the same shapes never recompile.
    """

    def __init__(
        self,
        loss_fn: LossFn,
        client_optimizer: optax.GradientTransformation,
        server_optimizer: ServerOptimizer = None,
        config: EngineConfig | None = None,
        *,
        prox_mu: float = 0.0,
    ):
        self.config = config or EngineConfig()
        self.client_optimizer = client_optimizer
        self.server_optimizer = server_optimizer
        if prox_mu < 0:
            raise ValueError(f"FedProx mu must be >= 0, got {prox_mu}")
        self.client_update = make_client_update(loss_fn, client_optimizer, prox_mu=prox_mu)
        cfg = self.config
        self.mesh: Mesh | None = None
        if cfg.backend in ("mesh", "pmap"):
            devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
            if cfg.num_devices is not None:
                if cfg.num_devices > len(devices):
                    raise ValueError(
                        f"num_devices={cfg.num_devices} but only {len(devices)} devices exist"
                    )
                devices = devices[: cfg.num_devices]
            if cfg.backend == "pmap":
                self.mesh = Mesh(np.array(devices), (CLIENT_AXIS,))
            else:
                self.mesh = placement.make_client_mesh(devices, cfg.data_parallel)
        spmd_axis = CLIENT_AXIS if cfg.backend == "mesh" else None
        # The host executor exists to reuse one compiled chunk step for every cohort size.
        self._host_chunks = (cfg.chunk_executor == "host" and cfg.clients_per_chunk is not None
                             and cfg.backend in ("vmap", "mesh"))
        self._process = functools.partial(
            _process_clients, self.client_update, cfg.carry_client_state, spmd_axis
        )
        self._server_step = functools.partial(_server_step, server_optimizer)
        donate = (0,) if cfg.donate else ()
        if cfg.backend == "loop":
            self._loop_client = jax.jit(self._loop_client_fn, donate_argnums=(1,))
            self._finish = jax.jit(self._server_step, donate_argnums=donate)
        elif cfg.backend == "pmap":
            self._pmap_round = jax.pmap(
                self._pmap_round_fn, axis_name=CLIENT_AXIS, in_axes=(None, 0),
                devices=list(self.mesh.devices.flat),
            )
        elif self._host_chunks:
            self._chunk_step = jax.jit(self._block_step, donate_argnums=(1,))
            self._finish = jax.jit(self._server_step, donate_argnums=donate)
            self._normalize = jax.jit(agg.normalize_weights)
            replicated = None if self.mesh is None else NamedSharding(self.mesh, P())
            self._zeros = jax.jit(agg.zeros_accumulator, out_shardings=replicated)
        else:
            self._round = jax.jit(self._vector_round_fn, donate_argnums=donate)

    # -- state ---------------------------------------------------------------------------

    @property
    def num_devices(self) -> int:
        return 1 if self.mesh is None else self.mesh.size

    @property
    def num_client_shards(self) -> int:
        """How many ways the client axis is split (devices / data_parallel)."""
        return placement.client_shards(self.mesh)

    def init(self, params: Params, rng: jax.Array) -> ServerState:
        """The round-0 server state (replicated over the mesh for the mesh backend)."""
        opt_state = () if self.server_optimizer is None else self.server_optimizer.init(params)
        if not jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
            rng = jax.random.wrap_key_data(rng) if rng.ndim else jax.random.key(rng)
        state = ServerState(
            params=params, opt_state=opt_state, round=jnp.zeros((), jnp.int32), rng=rng
        )
        # Own copies: the round donates the state's buffers, never the caller's params.
        state = jax.tree.map(lambda x: jnp.array(x, copy=True), state)
        if self.config.backend == "mesh":
            state = placement.replicate(state, self.mesh)
        elif self.config.backend == "pmap":
            # Committed to the first device, like the state a pmap round returns: otherwise
            # round 2 sees a differently placed input and compiles again.
            state = jax.device_put(state, self.mesh.devices.flat[0])
        return state

    def init_client_states(self, params: Params, num_clients: int) -> PyTree:
        """Fresh client optimizer states stacked on axis 0, for `carry_client_state`."""
        one = self.client_optimizer.init(params)
        return jax.tree.map(lambda x: jnp.broadcast_to(x, (num_clients,) + x.shape), one)

    def process_client_ids(self, num_clients: int, process_index: int | None = None) -> np.ndarray:
        """Positions in the (padded) cohort this process feeds to `run_round_local`, in order;
        positions `>= num_clients` are padding and come last (see `placement`)."""
        if self.config.backend != "mesh":
            raise ValueError("process-local client data needs backend='mesh'")
        processes = sorted({d.process_index for d in self.mesh.devices.flat})
        if processes != list(range(len(processes))):
            raise ValueError(f"the mesh must span processes 0..n-1, it spans {processes}")
        return placement.process_client_ids(
            num_clients,
            num_client_shards=self.num_client_shards,
            clients_per_chunk=self.config.clients_per_chunk,
            num_processes=len(processes),
            process_index=jax.process_index() if process_index is None else process_index,
            fixed_width=self._host_chunks,
        )

    def lower_chunk(
        self, params: Params, chunk_data: dict[str, Any], *, sharding: Sharding | None = None
    ) -> jax.stages.Lowered:
        """Lower, without running or allocating, the program that trains one chunk of K
        clients (`chunk_data` leaves `[K, S, B, ...]`). `params` and `chunk_data` may be
        `jax.ShapeDtypeStruct`s: memory planning reads the compiled memory analysis.
        `sharding` places every input, e.g. on a compile-only device (`scale.targets`), so the
        program compiles for that device rather than the default backend."""
        k = chunk_data["mask"].shape[0]
        state = jax.eval_shape(lambda p: self.init(p, jax.random.key(0)), params)
        acc = jax.eval_shape(agg.zeros_accumulator, params)
        cs = None
        if self.config.carry_client_state:
            cs = jax.eval_shape(lambda p: self.init_client_states(p, k), params)
        block = (chunk_data, jax.ShapeDtypeStruct((k,), jnp.int32),
                 jax.ShapeDtypeStruct((k,), jnp.float32), cs)
        args = (state, acc, block)
        if sharding is not None:
            args = jax.tree.map(
                lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), args)
        step = getattr(self, "_chunk_step", None) or jax.jit(self._block_step, donate_argnums=(1,))
        return step.lower(*args)

    # -- the round -----------------------------------------------------------------------

    def run_round(
        self,
        state: ServerState,
        data: dict[str, Any],
        *,
        client_ids: Any = None,
        weights: Any = None,
        client_states: PyTree | None = None,
    ) -> RoundResult:
        """One federated round over the cohort in `data` (leaves `[C, S, B, ...]`).

        `client_ids` are the cohort's population ids (they pick each client's PRNG key;
        default `0..C-1`); `weights` override the configured client weighting;
        `client_states` (`[C, ...]`) is required iff `carry_client_state` is set.
        In a multi-process run every process passes the whole cohort; `run_round_local`
        lets each pass only its own clients.
        """
        cfg = self.config
        mask = _check_data(data)
        num_clients = mask.shape[0]
        if cfg.carry_client_state != (client_states is not None):
            raise ValueError(
                "client_states must be given exactly when carry_client_state=True"
            )
        ids = _client_ids(client_ids, num_clients)
        w = _client_weights(mask, cfg.weighting) if weights is None else weights
        w = w.astype(np.float32) if isinstance(w, np.ndarray) else jnp.asarray(w, jnp.float32)

        if cfg.backend == "loop":
            p = agg.normalize_weights(w)
            state, loss, norm, per_client, new_cs = self._run_loop(
                state, data, ids, p, client_states
            )
        elif cfg.backend == "pmap":
            state, loss, norm, per_client, new_cs = self._run_pmap(
                state, data, ids, agg.normalize_weights(w), client_states, num_clients
            )
        else:
            width, padded = placement.layout(
                num_clients, cfg.clients_per_chunk, self.num_client_shards,
                fixed_width=self._host_chunks,
            )
            blocks = (data, ids, w, client_states)
            blocks = jax.tree.map(lambda x: _pad_axis0(x, padded), blocks)
            blocks = jax.tree.map(lambda x: x.reshape((padded // width, width) + x.shape[1:]),
                                  blocks)
            if self.mesh is not None:
                self._check_batch(mask.shape[2])
                blocks = jax.device_put(blocks, placement.block_shardings(self.mesh, blocks))
            state, loss, norm, per_client, new_cs = self._run_chunks(state, blocks, num_clients)
        return RoundResult(state, _metrics(loss, norm, per_client), new_cs)

    def run_round_local(
        self,
        state: ServerState,
        local_data: dict[str, Any],
        *,
        num_clients: int,
        client_ids: Any = None,
        weights: Any = None,
    ) -> RoundResult:
        """`run_round` where this process passes only its own clients (multi-host runs).

        `local_data` holds, stacked in order, the cohort positions
        `process_client_ids(num_clients)` (host arrays, leaves `[C_local, S, B, ...]`;
        padding positions all zeros). `client_ids` / `weights` are for the whole cohort
        (`[num_clients]`, known to every process). Same numbers as `run_round`.
        """
        cfg = self.config
        if cfg.carry_client_state:
            raise NotImplementedError(
                "carry_client_state with process-local data is not supported; "
                "use run_round with the whole cohort"
            )
        positions = self.process_client_ids(num_clients)
        local_data = jax.tree.map(np.asarray, local_data)
        mask = _check_data(local_data)
        if mask.shape[0] != len(positions):
            raise ValueError(
                f"this process feeds {len(positions)} clients (positions {positions.tolist()}),"
                f" got local data for {mask.shape[0]}"
            )
        self._check_batch(mask.shape[2])
        width, padded = placement.layout(num_clients, cfg.clients_per_chunk,
                                         self.num_client_shards, fixed_width=self._host_chunks)
        ids = _pad_axis0(_client_ids(client_ids, num_clients), padded)[positions]
        if weights is None:
            w = _client_weights(mask, cfg.weighting)
        else:
            w = _pad_axis0(np.asarray(weights, np.float32), padded)[positions]
        n = padded // width
        local = jax.tree.map(
            lambda x: x.reshape((n, len(positions) // n) + x.shape[1:]), (local_data, ids, w)
        )
        shardings = placement.block_shardings(self.mesh, local)
        blocks = jax.tree.map(
            lambda x, sh: jax.make_array_from_process_local_data(
                sh, x, (n, width) + x.shape[2:]
            ),
            local,
            shardings,
        )
        state, loss, norm, per_client, _ = self._run_chunks(state, (*blocks, None), num_clients)
        return RoundResult(state, _metrics(loss, norm, per_client), None)

    def _check_batch(self, batch_size: int) -> None:
        dp = self.config.data_parallel
        if batch_size % dp:
            raise ValueError(
                f"batch size {batch_size} must be a multiple of data_parallel={dp}: each "
                "client's batch is split evenly over the `data` mesh axis"
            )

    # -- loop backend --------------------------------------------------------------------

    def _loop_client_fn(self, state, acc, data, cid, p, client_state):
        block = jax.tree.map(lambda x: x[None], (data, cid, p, client_state))
        acc, (per_client, new_cs) = self._process(state, acc, block)
        return acc, (jax.tree.map(lambda x: x[0], per_client),
                     None if new_cs is None else jax.tree.map(lambda x: x[0], new_cs))

    def _run_loop(self, state, data, ids, p, client_states):
        acc = agg.zeros_accumulator(state.params)
        outs, states = [], []
        for i in range(len(ids)):
            client_data = jax.tree.map(lambda x, i=i: x[i], data)
            cs = None if client_states is None else jax.tree.map(lambda x, i=i: x[i], client_states)
            acc, (per_client, new_cs) = self._loop_client(state, acc, client_data, ids[i], p[i], cs)
            outs.append(per_client)
            states.append(new_cs)
        state, loss, norm = self._finish(state, acc)
        per_client = jax.tree.map(lambda *xs: jnp.stack(xs), *outs)
        new_cs = None if client_states is None else jax.tree.map(lambda *xs: jnp.stack(xs), *states)
        return state, loss, norm, per_client, new_cs

    # -- pmap backend --------------------------------------------------------------------

    def _pmap_round_fn(self, state, blocks):
        acc, outs = _run_blocks(self._process, state, blocks)
        acc = jax.lax.psum(acc, CLIENT_AXIS)
        state, loss, norm = self._server_step(state, acc)
        return state, loss, norm, outs

    def _run_pmap(self, state, data, ids, p, client_states, num_clients):
        d = self.num_devices
        padded = round_up(num_clients, d)
        blocks = jax.tree.map(lambda x: _pad_axis0(x, padded), (data, ids, p, client_states))
        blocks = jax.tree.map(lambda x: x.reshape((d, 1, padded // d) + x.shape[1:]), blocks)
        state_r, loss, norm, outs = self._pmap_round(state, blocks)
        # One replica, placed exactly like `init`'s state, so the next round hits the cache.
        first = self.mesh.devices.flat[0]
        state, loss, norm = jax.tree.map(lambda x: jax.device_put(x[0], first),
                                         (state_r, loss, norm))
        outs = jax.tree.map(lambda x: x.reshape((padded,) + x.shape[3:]), outs)
        per_client, new_cs = jax.tree.map(lambda x: x[:num_clients], outs)
        return state, loss, norm, per_client, new_cs

    # -- vmap / mesh backends ------------------------------------------------------------

    def _block_step(self, state, acc, block):
        """One block of clients; per-client metrics come back replicated (every process can
        read them), carried client states stay sharded."""
        acc, (per_client, new_cs) = self._process(state, acc, block)
        if self.mesh is not None:
            per_client = jax.lax.with_sharding_constraint(
                per_client, NamedSharding(self.mesh, P())
            )
        return acc, (per_client, new_cs)

    def _vector_round_fn(self, state, blocks):
        data, ids, w, cs = blocks
        blocks = (data, ids, agg.normalize_weights(w), cs)  # Σ over every block: all clients
        acc, outs = _run_blocks(self._block_step, state, blocks)
        state, loss, norm = self._server_step(state, acc)
        return state, loss, norm, outs

    def _run_chunks(self, state, blocks, num_clients):
        """Run `[n, K, ...]` blocks (raw weights) with the configured chunk executor."""
        n, width = blocks[1].shape
        if self._host_chunks:
            state, loss, norm, outs = self._host_chunked_round(state, blocks, n)
        else:
            state, loss, norm, outs = self._round(state, blocks)
        outs = jax.tree.map(lambda x: x.reshape((n * width,) + x.shape[2:]), outs)
        per_client, new_cs = jax.tree.map(lambda x: x[:num_clients], outs)
        return state, loss, norm, per_client, new_cs

    def _host_chunked_round(self, state, blocks, n):
        data, ids, w, cs = blocks
        blocks = (data, ids, self._normalize(w), cs)
        acc = self._zeros(state.params)
        outs = []
        for i in range(n):
            acc, out = self._chunk_step(state, acc, jax.tree.map(lambda x, i=i: x[i], blocks))
            outs.append(out)
        state, loss, norm = self._finish(state, acc)
        return state, loss, norm, jax.tree.map(lambda *xs: jnp.stack(xs), *outs)


def _check_data(data: dict[str, Any]):
    """Validate `[C, S, B, ...]` client data; return its mask."""
    if "mask" not in data:
        raise ValueError("client data needs an example mask data['mask'] of shape [C, S, B]")
    mask = data["mask"]
    if mask.ndim != 3:
        raise ValueError(f"data['mask'] must be [C, S, B], got shape {tuple(mask.shape)}")
    for path, leaf in jax.tree_util.tree_leaves_with_path(data):
        if tuple(leaf.shape[:3]) != tuple(mask.shape):
            raise ValueError(
                f"data leaf {jax.tree_util.keystr(path)} has shape {tuple(leaf.shape)}; "
                f"every leaf must start with [C, S, B] = {tuple(mask.shape)}"
            )
    return mask


def _client_ids(client_ids: Any, num_clients: int) -> np.ndarray:
    ids = np.arange(num_clients) if client_ids is None else np.asarray(client_ids)
    if ids.shape != (num_clients,):
        raise ValueError(f"client_ids must have shape ({num_clients},), got {ids.shape}")
    return ids.astype(np.int32)


def _metrics(loss, norm, per_client) -> RoundMetrics:
    c_loss, c_examples, c_norm, c_finite = per_client
    return RoundMetrics(
        loss=loss,
        client_loss=c_loss,
        client_examples=c_examples,
        client_update_norm=c_norm,
        client_finite=c_finite,
        update_norm=norm,
    )


def _pad_axis0(x, size: int):
    """Pad axis 0 with zeros (zero mask, zero weight, id 0) up to `size` clients."""
    if x.shape[0] == size:
        return x
    pad = [(0, size - x.shape[0])] + [(0, 0)] * (x.ndim - 1)
    return np.pad(x, pad) if isinstance(x, np.ndarray) else jnp.pad(x, pad)


def build_engine(
    loss_fn: LossFn,
    client_optimizer: optax.GradientTransformation,
    server_optimizer: ServerOptimizer = None,
    *,
    prox_mu: float = 0.0,
    **config: Any,
) -> FederatedEngine:
    """Shorthand: `build_engine(loss_fn, optax.sgd(0.1), backend="mesh", clients_per_chunk=8)`."""
    return FederatedEngine(
        loss_fn, client_optimizer, server_optimizer, EngineConfig(**config), prox_mu=prox_mu
    )
