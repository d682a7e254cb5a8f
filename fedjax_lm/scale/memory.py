"""How much device memory a round needs, and the widest client chunk that fits.

Nothing is allocated: shapes come from `jax.eval_shape`, and the engine's own chunk program is
lowered and compiled for the local backend; XLA's memory analysis (arguments + outputs + temps −
donated aliases) is its peak. A chunk's memory is affine in its width K, so two compiles give the
fixed part (server state, accumulator) and the marginal bytes of one more client (its params,
optimizer state, gradients and activations). Remat and bf16 enter through the loss function:
they change the compiled program, hence the estimate. Run it on the target backend for exact
numbers; a CPU compile fuses and schedules differently from a GPU/TPU one.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Sharding

from fedjax_lm.federated.algorithm import LossFn
from fedjax_lm.federated.engine import build_engine
from fedjax_lm.federated.server import ServerOptimizer
from fedjax_lm.federated.trainable import Trainable, trainable_part


@dataclasses.dataclass(frozen=True)
class BatchSpec:
    """One client's round of data: `local_steps` batches of `batch_size` examples, each with
    `features` (key → (per-example shape, dtype)); the float32 `mask` is added."""

    local_steps: int
    batch_size: int
    features: Mapping[str, tuple[tuple[int, ...], str]]

    def shapes(self, num_clients: int) -> dict[str, jax.ShapeDtypeStruct]:
        lead = (num_clients, self.local_steps, self.batch_size)
        out = {k: jax.ShapeDtypeStruct(lead + tuple(s), jnp.dtype(d))
               for k, (s, d) in self.features.items()}
        out["mask"] = jax.ShapeDtypeStruct(lead, jnp.float32)
        return out

    @property
    def bytes_per_client(self) -> int:
        return tree_bytes(self.shapes(1))


def text_batch(local_steps: int, batch_size: int, max_length: int) -> BatchSpec:
    """The engine's text-classification layout (int32 token ids, masks, types, label)."""
    seq = ((max_length,), "int32")
    return BatchSpec(local_steps, batch_size, {
        "input_ids": seq, "attention_mask": seq, "token_type_ids": seq, "label": ((), "int32"),
    })


def tree_bytes(tree) -> int:
    """Bytes of a pytree of arrays or `ShapeDtypeStruct`s."""
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Bytes of one round on one device, as `fixed + K · per_client` for a chunk of width K.

    `client_state_bytes` is the analytic state of one client (its trainable params + client
    optimizer state + its delta in the accumulator; under PEFT the frozen base is in `fixed`);
    `per_client_bytes` is the compiled marginal cost, which adds gradients and activations.
    """

    params_bytes: int
    client_state_bytes: int
    data_bytes_per_client: int
    fixed_bytes: int
    per_client_bytes: int

    @property
    def activation_bytes_per_client(self) -> int:
        return max(self.per_client_bytes - self.client_state_bytes, 0)

    def chunk_bytes(self, width: int) -> int:
        """Peak bytes of one chunk of `width` clients."""
        return self.fixed_bytes + width * self.per_client_bytes

    def round_bytes(self, num_clients: int, width: int) -> int:
        """A round of `num_clients` in chunks of `width` (the other chunks' data resident)."""
        return self.chunk_bytes(width) + (num_clients - width) * self.data_bytes_per_client

    def max_clients(self, budget: int, width: int | None = None) -> int:
        """Most clients that fit `budget`: unchunked (`width=None`), or in chunks of `width`."""
        if width is None:
            return max((budget - self.fixed_bytes) // self.per_client_bytes, 0)
        if self.chunk_bytes(width) > budget:
            return 0
        return width + (budget - self.chunk_bytes(width)) // self.data_bytes_per_client


def compiled_chunk_bytes(
    loss_fn: LossFn,
    params: object,
    client_optimizer: optax.GradientTransformation,
    batch: BatchSpec,
    width: int,
    *,
    server_optimizer: ServerOptimizer = None,
    carry_client_state: bool = False,
    sharding: Sharding | None = None,
    trainable: Trainable | None = None,
) -> int:
    """Peak bytes XLA reports for the engine's chunk program at `width` clients, compiled for
    the device `sharding` names (default: the local backend; see `scale.targets`);
    `trainable` (a PEFT mask) keeps only those leaves per client."""
    engine = build_engine(loss_fn, client_optimizer, server_optimizer,
                          carry_client_state=carry_client_state, clients_per_chunk=width,
                          chunk_executor="host", trainable=trainable)
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    lowered = engine.lower_chunk(params, batch.shapes(width), sharding=sharding)
    m = lowered.compile().memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
               - m.alias_size_in_bytes)


def estimate_memory(
    loss_fn: LossFn,
    params: object,
    client_optimizer: optax.GradientTransformation,
    batch: BatchSpec,
    *,
    server_optimizer: ServerOptimizer = None,
    carry_client_state: bool = False,
    widths: tuple[int, int] = (2, 4),
    sharding: Sharding | None = None,
    trainable: Trainable | None = None,
) -> MemoryEstimate:
    """Fit `fixed + K · per_client` from two compiles (`widths`) of the chunk program."""
    kw = dict(server_optimizer=server_optimizer, carry_client_state=carry_client_state,
              sharding=sharding, trainable=trainable)
    k1, k2 = widths
    b1, b2 = (compiled_chunk_bytes(loss_fn, params, client_optimizer, batch, k, **kw)
              for k in (k1, k2))
    per_client = max(-(-(b2 - b1) // (k2 - k1)), 1)
    train = trainable_part(trainable, params)
    opt_bytes = tree_bytes(jax.eval_shape(client_optimizer.init, train))
    return MemoryEstimate(
        params_bytes=tree_bytes(params),
        client_state_bytes=2 * tree_bytes(train) + opt_bytes,
        data_bytes_per_client=batch.bytes_per_client,
        fixed_bytes=max(b1 - k1 * per_client, 0),
        per_client_bytes=per_client,
    )


@dataclasses.dataclass(frozen=True)
class Probe:
    """One compile of the unchunked program: its bytes beside the linear estimate's."""

    clients: int
    compiled_bytes: int
    linear_bytes: int

    @property
    def below_linear(self) -> bool:
        """More than 2 % under the linear estimate: XLA reused buffers across clients, or (near
        its memory limit, which its log then reports) recomputed activations to fit."""
        return self.compiled_bytes < 0.98 * self.linear_bytes


def largest_unchunked(
    compile_bytes: Callable[[int], int],
    estimate: MemoryEstimate,
    budget: int,
    *,
    limit: int = 1 << 16,
) -> tuple[int, list[Probe]]:
    """The most clients whose unchunked program compiles within `budget` bytes, and the probes.

    The linear estimate (from two narrow compiles) is close while the program is far from
    XLA's own memory limit (~0.76 of a GPU's memory); past it, XLA recomputes activations so
    that more clients fit, more slowly, until the per-client state alone no longer does. So
    the edge is found by compiling: from the linear edge, double until a program does not fit,
    then bisect. Assumes the compiled bytes never fall as C grows.
    """
    probes: dict[int, Probe] = {}

    def fits(c: int) -> bool:
        if c not in probes:
            probes[c] = Probe(c, compile_bytes(c), estimate.chunk_bytes(c))
        return probes[c].compiled_bytes <= budget

    start = min(max(estimate.max_clients(budget), 1), limit)
    lo, hi = (start, None) if fits(start) else (0, start)
    while hi is None and lo < limit:
        nxt = min(2 * lo, limit)
        lo, hi = (nxt, None) if fits(nxt) else (lo, nxt)
    while hi is not None and hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo, [probes[c] for c in sorted(probes)]


def candidate_widths(num_clients: int) -> list[int]:
    """Chunk widths worth compiling: powers of two below C and divisors of C, widest first."""
    powers = {2**i for i in range(num_clients.bit_length()) if 2**i <= num_clients}
    divisors = {d for d in range(1, num_clients + 1) if num_clients % d == 0}
    return sorted(powers | divisors, reverse=True)


def widest_fitting(estimate: MemoryEstimate, num_clients: int, budget: int) -> int | None:
    """The widest candidate chunk whose round fits `budget` bytes, or None."""
    for width in candidate_widths(num_clients):
        if estimate.round_bytes(num_clients, width) <= budget:
            return width
    return None


def choose_chunk_width(
    loss_fn: LossFn,
    params: object,
    client_optimizer: optax.GradientTransformation,
    batch: BatchSpec,
    num_clients: int,
    device_memory_bytes: int,
    *,
    server_optimizer: ServerOptimizer = None,
    num_devices: int = 1,
    headroom: float = 0.9,
) -> int:
    """`clients_per_chunk="auto"`: the widest chunk (power of two or divisor of the clients per
    device) whose round fits `headroom · device_memory_bytes` on every device; returned as the
    engine's global `clients_per_chunk` (per-device width × `num_devices`)."""
    est = estimate_memory(loss_fn, params, client_optimizer, batch,
                          server_optimizer=server_optimizer)
    per_device = -(-num_clients // num_devices)
    budget = int(headroom * device_memory_bytes)
    width = widest_fitting(est, per_device, budget)
    if width is None:
        raise ValueError(
            f"one client needs {format_bytes(est.chunk_bytes(1))} but the budget is "
            f"{format_bytes(budget)}: use remat, bf16, a smaller batch or a bigger device"
        )
    return width * num_devices


def parse_bytes(text: str) -> int:
    """'80GB' (10^9), '80GiB' (2^30), '512MiB', '1e9' → bytes."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    t = text.strip().upper().replace(" ", "")
    number = t.rstrip("KMGTIB")
    unit = t[len(number):]
    try:
        size = float(number) * units[unit]
    except (KeyError, ValueError):
        raise ValueError(f"cannot read a memory size from {text!r} (try 80GB or 16GiB)") from None
    if not (math.isfinite(size) and size >= 1):
        raise ValueError(f"memory size {text!r} is not a finite size of at least 1 byte; "
                         "give one such as 80GB or 16GiB")
    return int(size)


def format_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"
