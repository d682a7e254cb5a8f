"""The round as a pure program over blocks of clients.

A cohort `[C, ...]` is padded with zero-weight clients and reshaped to blocks `[n, K, ...]`;
each block is vmapped over its K clients (`train_client`), its messages are folded into the
aggregator's chunk sums, and a `lax.scan` runs the blocks. `finish` reduces, lets the
algorithm update the server and counts the round. Every executor is built from these pieces,
so executors never change the math.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lm.federated.aggregate import Aggregate, Context, context_args, normalize_weights
from fedjax_lm.federated.algorithm import Algorithm, train_client
from fedjax_lm.federated.sampling import aggregation_key, client_key
from fedjax_lm.federated.state import (
    ClientInfo,
    ClientMetrics,
    Cohort,
    PyTree,
    RoundMetrics,
    RoundOutputs,
    ServerState,
)
from fedjax_lm.federated.tree import tree_all_finite, tree_distance


class RoundSums(NamedTuple):
    """Running sums over the clients processed so far (psum-able)."""

    partial: PyTree  # the aggregator's chunk sums; None for a whole-cohort aggregator
    loss: jax.Array  # Σ n_i·loss_i over finite clients
    examples: jax.Array  # Σ n_i over finite clients


class BlockOutputs(NamedTuple):
    """Per-client outputs of one block (leading axis K)."""

    metrics: ClientMetrics
    client_states: PyTree | None
    messages: PyTree | None  # kept only for a whole-cohort aggregator
    weights: jax.Array | None
    client_ids: jax.Array | None


def zero_sums(algorithm: Algorithm, state: ServerState) -> RoundSums:
    """Zero sums; the message template is traced from one client (nothing runs)."""
    partial = None
    if algorithm.aggregator.decomposable:
        template = message_shape(algorithm, state)
        partial = algorithm.aggregator.init(
            jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), template))
    zeros = [jnp.zeros((), jnp.float32) for _ in range(2)]  # distinct buffers: donated
    return RoundSums(partial, *zeros)


def message_shape(algorithm: Algorithm, state: ServerState) -> PyTree:
    """The shapes of one client's message, from the hooks alone (no data needed)."""

    def final(state):
        client = ClientInfo(jnp.zeros((), jnp.int32), state.rng, jnp.ones((), jnp.float32),
                            None if not algorithm.stateful
                            else algorithm.client_state_init(state.params))
        carry = algorithm.client_init(state, client)
        return algorithm.client_final(state, carry, client).message

    return jax.eval_shape(final, state)


def context(algorithm: Algorithm, state: ServerState, client_ids: jax.Array) -> Context:
    """A contextual aggregator's view of the round: the same for every chunk of it."""
    return Context(algorithm.reference(state), client_ids,
                   aggregation_key(state.rng, state.round))


def train_block(
    algorithm: Algorithm, spmd_axis_name: str | None, keep_messages: bool,
    state: ServerState, sums: RoundSums, block: Cohort,
) -> tuple[RoundSums, BlockOutputs]:
    """Train a block of K clients (vmapped; `block.weights` already normalised) and add
    them to the sums. A client whose message is not finite is dropped (weight 0) and keeps
    its previous carried state."""
    keys = jax.vmap(client_key, in_axes=(None, None, 0))(state.rng, state.round,
                                                         block.client_ids)
    clients = ClientInfo(block.client_ids, keys, block.weights, block.client_states)
    trained = jax.vmap(functools.partial(train_client, algorithm, state),
                       spmd_axis_name=spmd_axis_name)(clients, block.data)
    out = trained.output
    finite = jax.vmap(tree_all_finite)(out.message)

    def where_finite(x, other):
        return jnp.where(finite.reshape((-1,) + (1,) * (x.ndim - 1)), x, other)

    p = jnp.where(finite, out.weight, 0.0)
    messages = jax.tree.map(lambda x: where_finite(x, 0), out.message)
    partial = sums.partial
    if algorithm.aggregator.decomposable:
        agg = algorithm.aggregator
        partial = agg.add(partial, messages, p,
                          *context_args(agg, context(algorithm, state, block.client_ids)))
    n = jnp.where(finite, trained.examples, 0.0)
    sums = RoundSums(partial, sums.loss + jnp.sum(n * jnp.where(finite, trained.loss, 0.0)),
                     sums.examples + jnp.sum(n))
    new_states = None
    if algorithm.stateful:
        new_states = jax.tree.map(where_finite, out.client_state, block.client_states)
    metrics = ClientMetrics(trained.loss, trained.examples, out.update_norm, finite)
    kept = (messages, p, block.client_ids) if keep_messages else (None, None, None)
    return sums, BlockOutputs(metrics, new_states, *kept)


def finish(
    algorithm: Algorithm, state: ServerState, sums: RoundSums,
    messages: PyTree | None = None, weights: jax.Array | None = None,
    client_ids: jax.Array | None = None,
) -> tuple[ServerState, jax.Array, jax.Array]:
    """Reduce, update the server, count the round: (next state, mean loss, update norm)."""
    aggregator = algorithm.aggregator
    if aggregator.decomposable:
        aggregate: Aggregate = aggregator.finalize(sums.partial)
    else:
        ctx = context_args(aggregator, context(algorithm, state, client_ids))
        aggregate = aggregator.reduce(messages, weights, *ctx)
    new = algorithm.server_update(state, aggregate).replace(round=state.round + 1)
    loss = sums.loss / jnp.maximum(sums.examples, 1.0)
    return new, loss, tree_distance(new.params, state.params)


def scan_blocks(step, state: ServerState, sums: RoundSums, blocks: Cohort):
    """Run `step(state, sums, block)` over `[n, K, ...]` blocks: directly when n = 1."""
    if blocks.client_ids.shape[0] == 1:
        sums, outs = step(state, sums, jax.tree.map(lambda x: x[0], blocks))
        return sums, jax.tree.map(lambda x: x[None], outs)
    return jax.lax.scan(functools.partial(step, state), sums, blocks)


def blocks_round(
    algorithm: Algorithm, chunk_step, state: ServerState, blocks: Cohort
) -> tuple[ServerState, jax.Array, jax.Array, BlockOutputs]:
    """The whole round over `[n, K, ...]` blocks with raw weights (pure, jittable).
    `chunk_step(state, sums, block)` trains one block (`train_block` plus placement)."""
    blocks = blocks.replace(weights=normalize_weights(blocks.weights))  # Σ over every block
    sums, outs = scan_blocks(chunk_step, state, zero_sums(algorithm, state), blocks)
    flat = jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), outs)
    state, loss, norm = finish(algorithm, state, sums, flat.messages, flat.weights,
                               flat.client_ids)
    return state, loss, norm, outs


def to_blocks(cohort: Cohort, width: int, padded: int) -> Cohort:
    """`[C, ...]` → `[padded // width, width, ...]`, padding with zero-weight clients."""
    return jax.tree.map(
        lambda x: pad_axis0(x, padded).reshape((padded // width, width) + x.shape[1:]), cohort)


def pad_axis0(x: Any, size: int) -> Any:
    """Pad axis 0 with zeros (zero mask, zero weight, id 0) up to `size` clients."""
    if x.shape[0] == size:
        return x
    pad = [(0, size - x.shape[0])] + [(0, 0)] * (x.ndim - 1)
    return np.pad(x, pad) if isinstance(x, np.ndarray) else jnp.pad(x, pad)


def unblock(outs: BlockOutputs, num_clients: int) -> tuple[ClientMetrics, PyTree | None]:
    """`[n, K, ...]` per-client outputs → the cohort's `[C, ...]` (padding dropped)."""
    flat = jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:])[:num_clients],
                        (outs.metrics, outs.client_states))
    return flat


def round_outputs(loss, norm, metrics: ClientMetrics, client_states) -> RoundOutputs:
    return RoundOutputs(
        RoundMetrics(loss=loss, client_loss=metrics.loss, client_examples=metrics.examples,
                     client_update_norm=metrics.update_norm, client_finite=metrics.finite,
                     update_norm=norm),
        client_states,
    )
