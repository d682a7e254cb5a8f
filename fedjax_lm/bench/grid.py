"""What a bench run measures: groups of cells (model × backends × client counts) and presets.

A backend spec is `loop`, `vmap`, `mesh`, `pmap`, or `vmap@K` / `mesh@K` for
`clients_per_chunk=K` with the host chunk executor (one compiled K-client step for every C;
`@Ks` uses the scan executor instead).
"""

from __future__ import annotations

import dataclasses
import re

from fedjax_lm.federated.executors import BACKENDS
from fedjax_lm.grid import ConfigError

_SPEC = re.compile(r"^(loop|vmap|mesh|pmap)(?:@(\d+)(s?))?$")


@dataclasses.dataclass(frozen=True)
class BackendSpec:
    backend: str
    chunk: int | None = None
    executor: str = "host"

    @property
    def label(self) -> str:
        if self.chunk is None:
            return self.backend
        return f"{self.backend}@{self.chunk}{'s' if self.executor == 'scan' else ''}"

    @property
    def multi_device(self) -> bool:
        return self.backend in ("mesh", "pmap")


def parse_backend(spec: str) -> BackendSpec:
    """`loop`, `vmap@8`, `mesh@4s`, ... as a BackendSpec; a bad spec is a one-line ConfigError
    (a ValueError) naming the valid ones."""
    m = _SPEC.match(spec)
    if not m:
        raise ConfigError(f"bad backend spec {spec!r}: use one of {', '.join(BACKENDS)}, "
                          "optionally @K (clients_per_chunk, host executor) or @Ks (scan "
                          "executor)")
    backend, chunk, scan = m.groups()
    if chunk and backend in ("loop", "pmap"):
        raise ConfigError(f"{backend} does not take a chunk width ({spec!r}); use {backend} "
                          "alone, or vmap@K / mesh@K")
    if chunk and int(chunk) < 1:
        raise ConfigError(f"bad backend spec {spec!r}: the chunk width K of {backend}@K is "
                          f"the clients per chunk, >= 1; use {backend}@1 or more, or {backend}")
    return BackendSpec(backend, int(chunk) if chunk else None, "scan" if scan else "host")


@dataclasses.dataclass(frozen=True)
class Group:
    """Cells sharing one model: every backend × every C, peers at `peer_clients`."""

    model: str
    max_length: int
    clients: tuple[int, ...]
    backends: tuple[str, ...]
    peers: tuple[str, ...] = ()
    peer_clients: tuple[int, ...] | None = None  # None: every C in `clients`
    optimizer: str = "sgd"
    dtype: str = "float32"
    attention_impl: str = "xla"
    remat: bool = False
    batch_size: int = 8
    local_steps: int = 4
    stop_at_oom: bool = False  # GPU: keep raising C until it no longer fits
    peft: str = "none"  # none | lora | head | bitfit: only the trainable leaves per client
    lora_rank: int = 8
    lora_targets: str = "query,value"

    def specs(self) -> list[BackendSpec]:
        return [parse_backend(b) for b in self.backends]


_PEERS = ("torch-loop", "flower", "pfl")
# On CPU the best chunking depends on the model: tiny clients gain from being batched
# (vmap@8: one compiled 8-client step; @8s: the same chunks scanned inside one program),
# MiniLM-size clients already fill the cores alone, so clients run one after another inside
# one program (vmap@1s) — see benchmarks/results/NOTES.md.
_CPU_TINY = ("loop", "vmap", "vmap@8", "vmap@8s", "mesh", "pmap")
_CPU_MINI = ("loop", "vmap", "vmap@1s", "vmap@4", "mesh", "pmap")

PRESETS: dict[str, tuple[Group, ...]] = {
    # This 2-core CPU: the grid. MiniLM-size is trimmed to C ∈ {1, 8} (C = 8 is the
    # reference cell; every round there is ~16 s per backend).
    "cpu": (
        Group("tiny", 32, (1, 2, 4, 8, 16, 32), _CPU_TINY, _PEERS, (1, 8, 32)),
        Group("mini", 64, (1, 8), _CPU_MINI, _PEERS, (8,)),
    ),
    # One H100/H200 within ~8 minutes (benchmarks/gpu_run.sh, with `--trace 2`): the cells the
    # accelerator targets need. The 1- and 8-client cells of the previous GPU run are in git.
    "gpu": (
        Group("tiny", 32, (32,), ("loop", "vmap")),
        Group("mini", 64, (32,), ("loop", "vmap"), dtype="bfloat16"),
        Group("mini", 64, (32,), ("vmap",), dtype="bfloat16", attention_impl="dot_product"),
        # BERT-base × 32 clients with Adam in chunks of 8 (the previous run's cell); toward the
        # MFU target, wider chunks (bigger batched matmuls) with the fused attention.
        Group("base", 128, (32,), ("vmap@8",), optimizer="adam", dtype="bfloat16"),
        Group("base", 128, (32,), ("vmap@16",), optimizer="adam", dtype="bfloat16",
              attention_impl="dot_product"),
    ),
    # BERT-base unchunked: raise C until the first out-of-memory failure. Run in a fresh
    # process (gpu_run.sh runs it first): XLA's BFC allocator keeps the regions earlier cells
    # grew, and one 78.5 GiB buffer at C = 32 failed after them with the card mostly free. One
    # group per C, so a timeout keeps every finished cell; later groups skip C past an OOM.
    # Measured on an H200: C = 32 and 40 fit (79.4, 99.0 GiB). Past the linear edge XLA
    # rematerializes to hold ~0.76 of the card, so more fit than the linear fit predicts; its
    # compiled plan (`make plan-gpu`, deviceless; benchmarks/results/plan-deviceless/) puts the
    # edge under a 95 % cap at C = 71 on an H200 and C = 40 on an H100: these cells check it.
    **{f"gpu-largest-c-{card}": tuple(
        Group("base", 128, (c,), ("vmap",), optimizer="adam", dtype="bfloat16",
              stop_at_oom=True) for c in clients)
       for card, clients in (("h200", (64, 70, 71, 72)), ("h100", (32, 39, 40, 41)))},
    # Issue 16 on a card: LoRA R = 8 (query, value) clients of BERT-base, the workload of
    # `plan-h200-peft/` (Adam, bf16, 4 steps x batch 8 x length 128). Unchunked, raised until
    # the first out-of-memory failure around the compiled plan's edge (H200: 456 fits, 457 does
    # not; H100 scaled by memory), the edge first so that a timeout keeps it, then a width
    # below it; then C = 2,048 in the chunks of 256 the planner chose.
    **{f"gpu-peft-largest-c-{card}": tuple(
        Group("base", 128, (c,), ("vmap",), optimizer="adam", dtype="bfloat16",
              stop_at_oom=True, peft="lora") for c in clients)
       for card, clients in (("h200", (456, 464, 320)), ("h100", (256, 264, 160)))},
    "gpu-peft-2048": (Group("base", 128, (2048,), ("vmap@256",), optimizer="adam",
                            dtype="bfloat16", peft="lora"),),
}
