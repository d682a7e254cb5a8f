"""Exact aggregation of low-rank factor pairs: the weighted mean of the products A_i B_i,
refactored to the message's rank R by truncated SVD (model-agnostic: any nested-dict message
whose dicts hold both factor names).

Averaging A and B separately (FedIT) gives mean(A)·mean(B) ≠ mean(A B): biased. Here the
server takes M = Σ p_i A_i B_i (one matmul per chunk, `[d, K·R] @ [K·R, o]`: no per-client
d × o product is formed) and sends back A = U_R √S_R, B = √S_R V_Rᵀ, which equals M whenever
rank(M) ≤ R (e.g. one client, or clients sharing A) and is M's best rank-R approximation
otherwise. The split of M between the factors keeps A's Frobenius norm at the clients' mean
(A = U_R·c, B = S_R V_Rᵀ / c): a balanced √S split would shrink both factors towards zero
while M is still small (early rounds), where LoRA's gradients vanish.

We refactor rather than keep the residual M − A B in the frozen base (FedEx-LoRA):
the base stays the one pretrained copy every client already holds, so a client never
downloads a changed d × o matrix, and checkpoints of the base stay valid.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedjax_lm.federated.aggregate import Aggregate, Aggregator, WeightedSum
from fedjax_lm.federated.state import PyTree

_PRODUCT, _RANK, _NORM = "__product__", "__rank__", "__a_norm__"


def _is_pair(node, a: str, b: str) -> bool:
    return isinstance(node, dict) and node.get(a) is not None and node.get(b) is not None


def factor_product_mean(a: str = "lora_a", b: str = "lora_b") -> Aggregator:
    """Weighted mean of `a @ b` per factor pair, refactored to rank R; every other leaf is
    the weighted mean. Decomposes into chunk sums."""

    def init(template: PyTree) -> WeightedSum:
        def walk(node):
            if _is_pair(node, a, b):
                rest = {k: walk(v) for k, v in node.items() if k not in (a, b)}
                d, r, o = node[a].shape[0], node[a].shape[1], node[b].shape[1]
                return {**rest, _PRODUCT: jnp.zeros((d, o), node[a].dtype),
                        _RANK: jnp.zeros((0, r), node[a].dtype),  # R kept in a shape
                        _NORM: jnp.zeros((), jnp.float32)}
            if isinstance(node, dict):
                return {k: walk(v) for k, v in node.items()}
            return None if node is None else jnp.zeros(node.shape, node.dtype)

        return WeightedSum(walk(template), jnp.zeros((), jnp.float32))

    def add(partial: WeightedSum, messages: PyTree, p: jax.Array) -> WeightedSum:
        def walk(total, msg):
            if _is_pair(msg, a, b):
                rest = {k: walk(total[k], v) for k, v in msg.items() if k not in (a, b)}
                prod = jnp.einsum("k,kdr,kro->do", p.astype(msg[a].dtype), msg[a], msg[b])
                norms = jnp.sqrt(jnp.sum(jnp.square(msg[a].astype(jnp.float32)), axis=(1, 2)))
                return {**rest, _PRODUCT: total[_PRODUCT] + prod, _RANK: total[_RANK],
                        _NORM: total[_NORM] + jnp.sum(p * norms)}
            if isinstance(msg, dict):
                return {k: walk(total[k], v) for k, v in msg.items()}
            if msg is None:
                return None
            return total + jnp.tensordot(p.astype(msg.dtype), msg, axes=1)

        return WeightedSum(walk(partial.total, messages), partial.weight + jnp.sum(p))

    def finalize(partial: WeightedSum) -> Aggregate:
        has_any = partial.weight > 0
        denom = jnp.where(has_any, partial.weight, 1.0)

        def mean(x):
            return jnp.where(has_any, x / denom.astype(x.dtype), 0)

        def walk(node):
            if isinstance(node, dict) and _PRODUCT in node:
                rest = {k: walk(v) for k, v in node.items() if k not in (_PRODUCT, _RANK, _NORM)}
                factors = refactor(mean(node[_PRODUCT]), node[_RANK].shape[1], mean(node[_NORM]))
                return {**rest, **dict(zip((a, b), factors, strict=True))}
            if isinstance(node, dict):
                return {k: walk(v) for k, v in node.items()}
            return None if node is None else mean(node)

        return Aggregate(walk(partial.total), partial.weight)

    def reduce(messages: PyTree, p: jax.Array) -> Aggregate:
        template = jax.tree.map(lambda x: x[0], messages)
        return finalize(add(init(template), messages, p))

    return Aggregator("factor_product_mean", reduce, init, add, finalize)


@jax.custom_batching.custom_vmap
def svd_one_at_a_time(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`jnp.linalg.svd(x, full_matrices=False)`, but a batch (a vmapped federation axis)
    is decomposed one matrix after another.

    Why: jaxlib's CPU LAPACK kernels (jax 0.10.2) split a batch over XLA:CPU's intra-op
    thread pool and block a pool thread until the pieces finish; when several such calls
    run at once (one per LoRA pair, all independent) they can hold every pool thread and
    wait on each other forever — seen as a vectorized `lora_exact` sweep that hung with both
    threads of a 2-core machine parked in `sgesdd`. A single matrix runs inline, never in
    the pool. The R-truncated SVDs are a few d x o matrices a round, so the loop costs
    little on any backend.
    """
    u, s, vt = jnp.linalg.svd(x, full_matrices=False)
    return u, s, vt


@svd_one_at_a_time.def_vmap
def _svd_batched(axis_size: int, in_batched: list[bool], x: jax.Array):
    del axis_size
    if not in_batched[0]:
        return svd_one_at_a_time(x), (False, False, False)
    return jax.lax.map(svd_one_at_a_time, x), (True, True, True)


def refactor(product: jax.Array, rank: int, a_norm: jax.Array | float = 0.0
             ) -> tuple[jax.Array, jax.Array]:
    """(A [d, R], B [R, o]) with A B the best rank-R approximation of `product`; A has
    orthogonal columns of norm `a_norm / √R` (1 when `a_norm` is 0), B the rest."""
    u, s, vt = svd_one_at_a_time(product.astype(jnp.float32))
    r = min(rank, s.shape[0])
    c = jnp.where(a_norm > 0, a_norm / jnp.sqrt(float(rank)), 1.0)
    a = (u[:, :r] * c).astype(product.dtype)
    b = (s[:r, None] * vt[:r] / c).astype(product.dtype)
    if a.shape[1] < rank:  # the product is smaller than R: pad with zero components
        a = jnp.pad(a, ((0, 0), (0, rank - a.shape[1])))
        b = jnp.pad(b, ((0, rank - b.shape[0]), (0, 0)))
    return a, b
