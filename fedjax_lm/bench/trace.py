"""Where a round's device time goes: trace steady rounds with `jax.profiler`, sum kernel time.

A bench cell run with `--trace N` traces N more rounds after its timed ones (same executables,
no recompile) and reads the device's kernel events back from the XSpace the profiler writes.
Kernels are sorted into a few kinds by name — dense matmuls (cuBLAS / cuBLASLt / CUTLASS /
Triton GEMMs), fused attention, XLA's elementwise and reduction fusions, copies / transposes —
so a cell that misses its roofline says whether the matmuls, the memory-bound rest or host gaps
(device idle between kernels: dispatch, Python) take the time. On CPU, XLA's ops run on host
threads; those are read instead, coarser (a library matmul and its neighbours can share an op).
"""

from __future__ import annotations

import collections
import re
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import jax

# Checked in order; the first match names the kind. Kernel names are XLA's fusion names
# (`loop_add_fusion_3`, `input_reduce_fusion`) or the vendor library's (`nvjet_*`,
# `sm90_xmma_gemm_*`, `cutlass_*`); cuDNN's fused attention kernels mention flash / fmha.
KINDS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("fused attention", re.compile(r"flash|fmha|sdpa|cudnn", re.I)),
    ("matmul", re.compile(r"gemm|nvjet|cutlass|xmma|wgmma|cublas|\bdot|_dot|dot_|matmul|"
                          r"convolution", re.I)),
    # XLA expands threefry into fusions rooted at its xor / shift ops: a heuristic.
    ("random bits", re.compile(r"threefry|philox|rng|random|xor|shift_right", re.I)),
    ("reduction", re.compile(r"reduce|reduction|scatter", re.I)),
    ("copy / transpose", re.compile(r"copy|transpose|memcpy|memset|concatenate|"
                                    r"dynamic.update.slice|dynamic.slice", re.I)),
    ("elementwise fusion", re.compile(r"fusion|loop_|elementwise", re.I)),
)
# Host-thread events on CPU that are scheduling or that contain other ops (loops, calls).
_CPU_NOISE = re.compile(r"^(ThreadpoolListener|SlinkyThreadPool|ThunkExecutor|\$|while\.|"
                        r"call\.|conditional\.)")
_GPU_META_LINES = ("XLA Modules", "XLA Ops", "Steps", "Framework", "Launch Stats", "Source",
                   "XLA TraceMe", "TensorFlow", "Host")


def kind_of(name: str) -> str:
    for kind, pattern in KINDS:
        if pattern.search(name):
            return kind
    return "other"


def device_events(xspace: Path) -> tuple[str, list[tuple[str, float]], list[str]]:
    """(source, [(kernel name, seconds)], every plane/line seen) of one trace: GPU/TPU stream
    events where the trace has a device plane, else XLA:CPU's op events on its host threads."""
    from jax.profiler import ProfileData

    data = ProfileData.from_file(str(xspace))
    device, host, seen = [], [], []
    for plane in data.planes:
        seen += [f"{plane.name} | {ln.name}" for ln in plane.lines]
        if plane.name.startswith("/device:"):
            lines = [ln for ln in plane.lines if not ln.name.startswith(_GPU_META_LINES)]
            streams = [ln for ln in lines if ln.name.startswith("Stream")] or [
                ln for ln in plane.lines if ln.name == "XLA Ops"]
            device += [(e.name, e.duration_ns * 1e-9) for ln in streams for e in ln.events]
        elif plane.name == "/host:CPU":
            host += [(e.name, e.duration_ns * 1e-9) for ln in plane.lines
                     if ln.name.startswith("tf_XLA") for e in ln.events
                     if not _CPU_NOISE.match(e.name) and e.duration_ns > 0]
    if device:
        return "device kernels", device, seen
    return "XLA:CPU ops on host threads", host, seen


def breakdown(events: Iterable[tuple[str, float]], rounds: int, wall_s: float,
              top: int = 12) -> dict[str, Any]:
    """Per-round seconds by kind and the `top` kernels, plus how busy the device was."""
    by_kind: dict[str, float] = collections.defaultdict(float)
    by_name: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for name, sec in events:
        by_kind[kind_of(name)] += sec
        by_name[name][0] += sec
        by_name[name][1] += 1
    busy = sum(by_kind.values())
    kernels = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]
    return {
        "rounds": rounds,
        "wall_s_per_round": wall_s / rounds,
        "busy_s_per_round": busy / rounds,
        # > 1 is possible on CPU (ops on several threads at once) or overlapping streams.
        "busy_fraction": busy / wall_s if wall_s else None,
        "kinds_s_per_round": {k: v / rounds for k, v in
                              sorted(by_kind.items(), key=lambda kv: -kv[1])},
        "top_kernels": [{"name": n[:160], "kind": kind_of(n), "s_per_round": s / rounds,
                         "calls_per_round": c / rounds} for n, (s, c) in kernels],
    }


def trace_rounds(run_round: Callable[[], Any], rounds: int) -> dict[str, Any]:
    """Trace `rounds` calls of `run_round` (each blocks until done) and break them down."""
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp):
            t = time.perf_counter()
            for _ in range(rounds):
                run_round()
            wall = time.perf_counter() - t
        files = sorted(Path(tmp).rglob("*.xplane.pb"))
        if not files:
            return {"error": "the profiler wrote no .xplane.pb"}
        source, events, seen = device_events(files[-1])
    return {"source": source, **breakdown(events, rounds, wall), "lines_seen": seen[:40]}
