"""Joining JAX's distributed runtime: one process per host, one config on 1 CPU or a pod.

JAX's own runtime (`jax.distributed.initialize`) is the transport: after it, `jax.devices()`
lists every device of every process and one jitted round spans them all. It must run before
anything touches a device, so call `maybe_initialize_distributed()` first thing in `main`.
Only process 0 writes metrics and results (`is_primary`); checkpoints of the (replicated,
global `jax.Array`) server state go through orbax, which every process must call together.
"""

from __future__ import annotations

import dataclasses
import glob
import os
from collections.abc import Mapping
from typing import Literal

import jax

ENV_PREFIX = "FEDJAX_LM_"
Enabled = Literal["auto", "on", "off"]


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """How (and whether) to join a multi-process run.

    `enabled="auto"` joins when the environment says this is one of several processes
    (our launcher's variables, SLURM with more than one task, a TPU pod slice); fields left
    `None` are found by JAX's own cluster detection (SLURM, Cloud TPU, Open MPI, k8s).
    `cpu_collectives` makes cross-process collectives work on CPU devices (ignored elsewhere).
    """

    enabled: Enabled = "auto"
    coordinator_address: str | None = None  # "host:port" of process 0
    num_processes: int | None = None
    process_id: int | None = None
    cpu_collectives: str | None = "gloo"

    def __post_init__(self) -> None:
        if self.enabled not in ("auto", "on", "off"):
            raise ValueError(f"enabled must be 'auto', 'on' or 'off', got {self.enabled!r}")
        if self.num_processes is not None and self.num_processes < 1:
            raise ValueError(f"num_processes must be >= 1, got {self.num_processes}")
        if self.process_id is not None and self.num_processes is not None and not (
            0 <= self.process_id < self.num_processes
        ):
            raise ValueError(f"process_id {self.process_id} not in [0, {self.num_processes})")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides) -> DistributedConfig:
        """Read `FEDJAX_LM_{DISTRIBUTED,COORDINATOR,NUM_PROCESSES,PROCESS_ID,CPU_COLLECTIVES}`;
        keyword `overrides` that are not `None` win (command-line flags)."""
        env = os.environ if environ is None else environ

        def get(name: str, cast=str):
            value = env.get(ENV_PREFIX + name)
            return None if value in (None, "") else cast(value)

        fields = dict(
            enabled=get("DISTRIBUTED") or "auto",
            coordinator_address=get("COORDINATOR"),
            num_processes=get("NUM_PROCESSES", int),
            process_id=get("PROCESS_ID", int),
        )
        collectives = get("CPU_COLLECTIVES")
        if collectives is not None:
            fields["cpu_collectives"] = None if collectives == "none" else collectives
        fields.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**fields)


def detect_cluster(
    cfg: DistributedConfig, environ: Mapping[str, str] | None = None, tpu_present: bool = False
) -> str | None:
    """Why this process should join a multi-process run (`"config"`, `"slurm"`, `"tpu"`), or
    `None`. Pure, so the rules are testable without a cluster."""
    env = os.environ if environ is None else environ
    if cfg.enabled == "off":
        return None
    if cfg.enabled == "on" or (cfg.num_processes or 1) > 1 or cfg.coordinator_address:
        return "config"
    if int(env.get("SLURM_NTASKS", env.get("SLURM_NPROCS", "1")) or 1) > 1:
        return "slurm"
    hosts = env.get("TPU_WORKER_HOSTNAMES") or env.get("TPU_PROCESS_ADDRESSES") or ""
    if "," in hosts or env.get("MEGASCALE_COORDINATOR_ADDRESS") or tpu_present:
        return "tpu"
    return None


def maybe_initialize_distributed(cfg: DistributedConfig | None = None) -> bool:
    """Call `jax.distributed.initialize` when `cfg` (default: from the environment) asks for
    it; return whether this process is part of a multi-process run. Safe to call twice."""
    cfg = DistributedConfig.from_env() if cfg is None else cfg
    if jax.distributed.is_initialized():
        return True
    if detect_cluster(cfg, tpu_present=bool(glob.glob("/dev/accel*"))) is None:
        return False
    if cfg.cpu_collectives:
        jax.config.update("jax_cpu_collectives_implementation", cfg.cpu_collectives)
    kwargs = {
        "coordinator_address": cfg.coordinator_address,
        "num_processes": cfg.num_processes,
        "process_id": cfg.process_id,
    }
    jax.distributed.initialize(**{k: v for k, v in kwargs.items() if v is not None})
    return True


def is_primary() -> bool:
    """True on the one process that writes metrics, results and logs (process 0)."""
    return jax.process_index() == 0
