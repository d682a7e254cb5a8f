"""Compile targets for memory planning: the local device, or a GPU this machine does not have.

XLA can compile for a CUDA device without one ("deviceless" AOT): JAX's CUDA plugin builds a
compile-only client from a `GpuTargetConfig` (the card's SM count, memory, caches, compute
capability), and an input placed on that client's device makes `jit(...).lower().compile()`
produce the GPU program, whose memory analysis is then the GPU's, not the CPU compiler's.
This needs the plugin (`pip install "jax[cuda12]==<jax version>"`, no GPU or driver) and JAX
started on the CPU platform (`fedjax-lm plan` sets that itself).

Built-in cards come from datasheets; XLA's memory decisions read mostly `device_memory_size`
(its rematerialization limit is ~0.8 × 0.95 of it). For the exact card a run will use, dump
its config once on that machine (`python -m fedjax_lm.scale.targets --dump h200.textproto`)
and plan with `--target h200.textproto`.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import re
import sys
from collections.abc import Sequence

import jax
from jax.sharding import NamedSharding, PartitionSpec, Sharding

from fedjax_lm.io import atomic_write_text

CUDA_PLUGINS = ("jax_plugins.xla_cuda12", "jax_plugins.xla_cuda13")


@dataclasses.dataclass(frozen=True)
class GpuSpec:
    """What XLA's GPU compiler is told about a card (the fields of a `GpuTargetConfig`)."""

    description: str
    memory_bytes: int
    core_count: int
    compute_capability: tuple[int, int]
    memory_bandwidth: int  # bytes / s
    l2_cache_bytes: int
    clock_ghz: float
    shared_memory_per_core: int
    shared_memory_per_block_optin: int

    def target_config(self) -> str:
        """The `GpuTargetConfig` text proto XLA's compile-only CUDA client reads."""
        major, minor = self.compute_capability
        return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: {self.shared_memory_per_core}
  threads_per_core_limit: 2048
  core_count: {self.core_count}
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {self.memory_bandwidth}
  l2_cache_size: {self.l2_cache_bytes}
  clock_rate_ghz: {self.clock_ghz}
  device_memory_size: {self.memory_bytes}
  shared_memory_per_block_optin: {self.shared_memory_per_block_optin}
  cuda_compute_capability {{ major: {major} minor: {minor} }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 8 }}
runtime_version {{ major: 12 minor: 8 }}
device_description_str: "{self.description}"
"""


_MIB = 2**20
# Memory as `nvidia-smi` reports it (what the allocator sees), the rest from datasheets.
GPUS: dict[str, GpuSpec] = {
    "a100": GpuSpec("NVIDIA A100-SXM4-80GB", 81920 * _MIB, 108, (8, 0), 2_039 * 10**9,
                    40 * _MIB, 1.41, 167_936, 166_912),
    "h100": GpuSpec("NVIDIA H100 80GB HBM3", 81559 * _MIB, 132, (9, 0), 3_350 * 10**9,
                    50 * _MIB, 1.98, 233_472, 232_448),
    "h200": GpuSpec("NVIDIA H200", 143771 * _MIB, 132, (9, 0), 4_800 * 10**9,
                    50 * _MIB, 1.98, 233_472, 232_448),
}


@dataclasses.dataclass(frozen=True)
class CompileTarget:
    """Where planned programs compile: `sharding` places their inputs (None: the local default
    device); `memory_bytes` is the device's memory when known."""

    name: str
    description: str
    sharding: Sharding | None
    memory_bytes: int | None


def local_target() -> CompileTarget:
    device = jax.devices()[0]
    stats = device.memory_stats() or {}
    return CompileTarget("local", f"{device.platform}: {device.device_kind}", None,
                         stats.get("bytes_limit"))


def resolve_target(target: str) -> CompileTarget:
    """`local`, a built-in card (`a100`, `h100`, `h200`) or a `GpuTargetConfig` file."""
    if target == "local":
        return local_target()
    if target.lower() in GPUS:
        spec = GPUS[target.lower()]
        return gpu_target(spec.target_config(), target.lower())
    if os.path.isfile(target):
        with open(target) as f:
            return gpu_target(f.read(), target)
    raise ValueError(f"unknown compile target {target!r}: use local, "
                     f"{', '.join(sorted(GPUS))}, or a GpuTargetConfig text-proto file")


def config_memory_bytes(config: str) -> int | None:
    m = re.search(r"device_memory_size:\s*(\d+)", config)
    return int(m.group(1)) if m else None


def cuda_plugin_installed() -> bool:
    if importlib.util.find_spec("jax_plugins") is None:
        return False
    return any(importlib.util.find_spec(name) is not None for name in CUDA_PLUGINS)


def use_cpu_platform_for(target: str) -> None:
    """A compile-only GPU needs JAX on the CPU platform where no GPU is present (the CUDA
    plugin fails to start otherwise). For commands that only compile (`plan`, `bench.planned`)."""
    if target != "local" and "JAX_PLATFORMS" not in os.environ \
            and cuda_plugin_installed():
        jax.config.update("jax_platforms", "cpu")


def gpu_target(config: str, name: str) -> CompileTarget:
    """A compile-only CUDA device described by `config` (a `GpuTargetConfig` text proto)."""
    if not cuda_plugin_installed():
        raise ValueError(
            f"compiling for {name} without the GPU needs JAX's CUDA plugin (no GPU or driver "
            f"required): pip install 'jax[cuda12]=={jax.__version__}' (or `make plan-gpu`)")
    from jax.experimental import topologies

    try:
        topology = topologies.get_topology_desc(platform="cuda", target_config=config,
                                                topology="1x1x1")
    except NotImplementedError:
        raise ValueError(
            "JAX's CUDA plugin could not start a compile-only client: without a GPU, start JAX "
            "on the CPU platform (JAX_PLATFORMS=cpu; `fedjax-lm plan` does this)") from None
    except Exception as e:  # noqa: BLE001 — XLA reports a bad config as a generic error
        raise ValueError(f"XLA rejected the GPU target config {name!r}: {e}") from None
    device = topology.devices[0]
    mesh = topologies.make_mesh(topology, (1,), ("device",))
    return CompileTarget(name, f"compile-only {device.device_kind}",
                         NamedSharding(mesh, PartitionSpec()), config_memory_bytes(config))


def local_target_config() -> str:
    """The local GPU's `GpuTargetConfig` (run on the machine whose card you want to plan for)."""
    from jax._src.lib import xla_client

    devices = jax.devices()
    if devices[0].platform != "gpu":
        raise ValueError(f"no GPU here (the default device is {devices[0].platform})")
    return xla_client.get_topology_for_devices(devices[:1]).target_config


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fedjax_lm.scale.targets",
                                description="Print a built-in card's GpuTargetConfig, or dump "
                                "this machine's GPU's for `fedjax-lm plan --target FILE`.")
    p.add_argument("--dump", metavar="FILE", help="write the local GPU's config to FILE")
    p.add_argument("--show", choices=sorted(GPUS), help="print a built-in card's config")
    args = p.parse_args(argv)
    try:
        if args.dump:
            atomic_write_text(args.dump, local_target_config())
            print(f"wrote {args.dump} ({jax.devices()[0].device_kind})")
        elif args.show:
            print(GPUS[args.show].target_config(), end="")
        else:
            p.print_usage()
            return 2
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
