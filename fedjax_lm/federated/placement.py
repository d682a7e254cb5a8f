"""Where clients live: the (`clients`, `data`) device mesh and which process feeds which clients.

A round's blocks are `[n_chunks, K, S, B, ...]`. The `clients` mesh axis shards K; the optional
`data` axis shards each client's batch B (a client's masked-mean loss is then reduced by XLA
across the `data` devices: the same math, so 4 clients can use 8 devices). Devices are ordered by
(process, id), so in a multi-process run every process owns a contiguous run of client shards
and therefore a contiguous slice of every chunk: `process_client_ids` names that slice, and that
is the only data the process has to load.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from fedjax_lm.federated.state import Cohort

CLIENT_AXIS = "clients"
DATA_AXIS = "data"


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def make_client_mesh(devices: Sequence[jax.Device], data_parallel: int = 1) -> Mesh:
    """A `clients` (× `data` when `data_parallel > 1`) mesh over `devices`.

    Each `data` row must sit inside one process: process-local client data then carries whole
    batches, and only the tiny per-round aggregate crosses hosts.
    """
    devices = sorted(devices, key=lambda d: (d.process_index, d.id))
    if data_parallel < 1 or len(devices) % data_parallel:
        raise ValueError(
            f"data_parallel={data_parallel} must divide the number of devices ({len(devices)})"
        )
    grid = np.empty(len(devices), dtype=object)
    grid[:] = devices
    grid = grid.reshape(len(devices) // data_parallel, data_parallel)
    if any(len({d.process_index for d in row}) > 1 for row in grid):
        raise ValueError(
            f"data_parallel={data_parallel} must divide the devices of each process, so that "
            "one client's batch never spans processes"
        )
    if data_parallel == 1:
        return Mesh(grid[:, 0], (CLIENT_AXIS,))
    return Mesh(grid, (CLIENT_AXIS, DATA_AXIS))


def client_shards(mesh: Mesh | None) -> int:
    """How many ways the client axis is split."""
    return 1 if mesh is None else mesh.shape[CLIENT_AXIS]


def block_shardings(mesh: Mesh, blocks: Cohort) -> Cohort:
    """Shardings for `[n, K, ...]` cohort blocks: K over `clients`, and the batch axis of data
    leaves over `data` when the mesh has one."""
    data_spec = P(None, CLIENT_AXIS, None, DATA_AXIS) if DATA_AXIS in mesh.shape else P(
        None, CLIENT_AXIS
    )
    per_client = NamedSharding(mesh, P(None, CLIENT_AXIS))
    return Cohort(
        data=jax.tree.map(lambda _: NamedSharding(mesh, data_spec), blocks.data),
        client_ids=per_client,
        weights=per_client,
        client_states=jax.tree.map(lambda _: per_client, blocks.client_states),
    )


def layout(
    num_clients: int, clients_per_chunk: int | None, num_client_shards: int,
    *, fixed_width: bool = False,
):
    """`(block width K, padded C)`: K is the chunk width (or all clients) rounded up to the
    client shards, and C is padded with zero-weight clients to a multiple of K. A cohort
    smaller than the chunk gets a narrower block (no compute on padding clients) unless
    `fixed_width`: then every C runs the same compiled chunk step (one compile per sweep)."""
    width = clients_per_chunk or num_clients
    if not fixed_width:
        width = min(width, num_clients)
    width = round_up(width, num_client_shards)
    return width, round_up(num_clients, width)


def process_client_ids(
    num_clients: int,
    *,
    num_client_shards: int,
    clients_per_chunk: int | None = None,
    num_processes: int | None = None,
    process_index: int | None = None,
    fixed_width: bool = False,
) -> np.ndarray:
    """Positions in the padded cohort that process `process_index` feeds, in the order its
    process-local data must be stacked (one contiguous slice of each chunk).

    Positions `>= num_clients` are padding: they always come last, so a process loads the
    cohort members `positions[positions < num_clients]` and appends all-zero clients.
    """
    num_processes = jax.process_count() if num_processes is None else num_processes
    process_index = jax.process_index() if process_index is None else process_index
    if num_client_shards % num_processes:
        raise ValueError(
            f"{num_client_shards} client shards cannot be split evenly over "
            f"{num_processes} processes"
        )
    if not 0 <= process_index < num_processes:
        raise ValueError(f"process_index {process_index} not in [0, {num_processes})")
    width, padded = layout(num_clients, clients_per_chunk, num_client_shards,
                           fixed_width=fixed_width)
    per_process = width // num_processes
    starts = np.arange(0, padded, width) + process_index * per_process
    return (starts[:, None] + np.arange(per_process)[None, :]).reshape(-1)


def replicate(tree, mesh: Mesh):
    """Put a pytree replicated on every device of `mesh`, also when the mesh spans processes
    (each process holds the same host value; typed PRNG keys go through their key data)."""
    sharding = NamedSharding(mesh, P())
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)

    def put(x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            data = jax.make_array_from_process_local_data(
                sharding, np.asarray(jax.random.key_data(x))
            )
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
        return jax.make_array_from_process_local_data(sharding, np.asarray(x))

    return jax.tree.map(put, tree)
