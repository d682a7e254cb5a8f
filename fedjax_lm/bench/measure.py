"""Timing one bench cell (backend × C): compile, steady rounds, FLOP/s, memory, compilations.

One engine per backend is reused across the client sweep, so the compile counts show what a
user's sweep would recompile; the steady rounds run under a compile counter too, which proves
rounds never recompile.
"""

from __future__ import annotations

import statistics
import threading
import time
from typing import Any

import jax
import numpy as np
import optax
import psutil

from fedjax_lm import federated as fl
from fedjax_lm.bench.workload import (
    Workload,
    synthetic_data,
    train_flops_per_token,
    trainable_mask,
)
from fedjax_lm.federated.compilation import count_compilations
from fedjax_lm.federated.trainable import count
from fedjax_lm.models import Model


def matmul_roofline(dtype: str = "float32", n: int | None = None, reps: int | None = None
                    ) -> float:
    """Best FLOP/s of a big jitted square matmul in this process: the dense-compute ceiling.

    Measured here rather than quoted so the ratio is against the same machine, dtype and load.
    """
    on_cpu = jax.default_backend() == "cpu"
    n = n or (2048 if on_cpu else 8192)
    reps = reps or (5 if on_cpu else 50)  # an accelerator needs a few ms busy to clock up
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), dtype)  # random: constant inputs time unrealistically
    b = jax.random.normal(kb, (n, n), dtype)
    mm = jax.jit(lambda x, y: x @ y)
    mm(a, b).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        mm(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2.0 * n**3 / best


class PeakRSS:
    """Peak resident memory of this process while active (sampled; host RAM is what a CPU run
    is limited by). `resource.ru_maxrss` is a lifetime peak, useless per cell."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._proc = psutil.Process()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRSS:
        self.peak = self._proc.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


def device_peak_bytes() -> int | None:
    """Accelerator peak bytes in use (process lifetime: cells run in ascending C), or None."""
    stats = jax.devices()[0].memory_stats() if jax.default_backend() != "cpu" else None
    return None if not stats else int(stats.get("peak_bytes_in_use", 0))


def device_cell_peak(before: int, after: int) -> tuple[int, str]:
    """A cell's device memory peak from the process-wide peak (which JAX cannot reset) read
    before and after it: its own where it raised the peak, else only bounded by it."""
    return after, "device_peak" if after > before else "device_peak_bound"


def client_optimizer(name: str, lr: float | None = None) -> optax.GradientTransformation:
    """The bench's client optimizer: SGD at 0.01 or Adam at 1e-4 unless `lr` is given."""
    if name not in ("sgd", "adam"):
        raise ValueError(f"unknown optimizer {name!r}; choose sgd or adam")
    return fl.make_client_optimizer(name, lr or {"sgd": 0.01, "adam": 1e-4}[name])


def make_engine(
    loss_fn: Any, backend: str, optimizer: str, chunk: int | None, executor: str = "host",
    trainable: Any = None,
) -> fl.FederatedEngine:
    """Plain FedAvg (server lr 1 = the mean), as the peers do; `trainable`: PEFT clients."""
    return fl.build_engine(
        loss_fn, client_optimizer(optimizer), None, backend=backend,
        clients_per_chunk=chunk, chunk_executor=executor, trainable=trainable,
    )


def step_cache_size(engine: fl.FederatedEngine) -> int | None:
    """Executables compiled for the engine's client-step program (the expensive one); None
    where the program cannot say (pmap)."""
    counts = engine.compiled_executables()
    return next((counts[name] for name in ("chunk", "client", "round") if name in counts), None)


def run_cell(
    engine: fl.FederatedEngine,
    model: Model,
    params: Any,
    w: Workload,
    rounds: int,
    seed: int = 0,
    trace_rounds: int = 0,
) -> dict[str, Any]:
    """Time one cell: the first round (compile + run) and `rounds` steady rounds; then, with
    `trace_rounds`, profile that many more rounds (untimed) for the kernel breakdown."""
    data = synthetic_data(w, model.config.vocab_size, seed)
    state = engine.init(params, jax.random.key(seed))
    mem_before = device_peak_bytes()
    with PeakRSS() as rss, count_compilations() as first_compiles:
        t = time.perf_counter()
        result = jax.block_until_ready(engine.run_round(state, data))
        first = time.perf_counter() - t
        times = []
        with count_compilations() as steady_compiles:
            for _ in range(rounds):
                t = time.perf_counter()
                result = jax.block_until_ready(engine.run_round(result.state, data))
                times.append(time.perf_counter() - t)
    round_s = statistics.median(times)
    trace = None
    if trace_rounds:
        from fedjax_lm.bench.trace import trace_rounds as trace_fn

        def one_round() -> None:
            nonlocal result  # rounds may donate their input state: carry it on
            result = jax.block_until_ready(engine.run_round(result.state, data))

        try:
            trace = trace_fn(one_round, trace_rounds)
        except Exception as e:  # noqa: BLE001 — a profiler failure must not lose the timings
            trace = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    frozen = w.peft != "none"
    flops = train_flops_per_token(model.config, w.max_length, frozen) * w.tokens_per_round
    peak, peak_kind = ((rss.peak, "host_rss") if mem_before is None
                       else device_cell_peak(mem_before, device_peak_bytes()))
    return {
        "compile_s": max(first - round_s, 0.0),
        "first_round_s": first,
        "round_s": round_s,
        "round_times_s": times,
        "examples_per_s": w.examples_per_round / round_s,
        "tokens_per_s": w.tokens_per_round / round_s,
        "flops_per_round": flops,
        "flops_per_s": flops / round_s,
        "peak_mem_bytes": peak,
        "peak_mem_kind": peak_kind,
        "compiles": first_compiles.count,
        "steady_compiles": steady_compiles.count,
        "step_executables": step_cache_size(engine),
        "final_loss": float(np.asarray(result.metrics.loss)),
        # What one client sends (= receives) per round: its trainable leaves.
        "upload_bytes_per_client": count(trainable_mask(w, params), params)[0],
        **({"trace": trace} if trace else {}),
    }
