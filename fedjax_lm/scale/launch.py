"""Try a multi-host run on one machine: N local processes × D fake CPU devices each.

`python -m fedjax_lm.scale.launch --num-processes 2 --devices-per-process 2 -- script.py ARGS`
starts `python script.py ARGS` N times with the `FEDJAX_LM_*` variables that
`maybe_initialize_distributed` reads (coordinator on 127.0.0.1 and a free port, gloo CPU
collectives), forwards their output, and stops every child when one fails, on timeout or on
Ctrl-C. The exit code is the first failing child's (124 on timeout, 130 on Ctrl-C), else 0.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence

_DEVICE_FLAG = "--xla_force_host_platform_device_count"


def free_port() -> int:
    """A TCP port free right now on 127.0.0.1 (the coordinator binds it moments later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(
    base: Mapping[str, str], *, port: int, num_processes: int, process_id: int, devices: int
) -> dict[str, str]:
    """The environment of local process `process_id`: CPU only, `devices` fake devices (any
    inherited device-count flag is replaced), and the distributed-runtime variables."""
    flags = [f for f in base.get("XLA_FLAGS", "").split() if not f.startswith(_DEVICE_FLAG)]
    return {
        **base,
        "XLA_FLAGS": " ".join([*flags, f"{_DEVICE_FLAG}={devices}"]),
        "JAX_PLATFORMS": "cpu",
        "FEDJAX_LM_DISTRIBUTED": "on",
        "FEDJAX_LM_COORDINATOR": f"127.0.0.1:{port}",
        "FEDJAX_LM_NUM_PROCESSES": str(num_processes),
        "FEDJAX_LM_PROCESS_ID": str(process_id),
        "FEDJAX_LM_CPU_COLLECTIVES": "gloo",
    }


def _stop(procs: Sequence[subprocess.Popen], grace: float = 5.0) -> None:
    """SIGTERM every live child, then SIGKILL what is left after `grace` seconds."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(timeout=max(deadline - time.monotonic(), 0.01))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def launch(
    command: Sequence[str],
    *,
    num_processes: int = 2,
    devices_per_process: int = 2,
    timeout: float | None = None,
    env: Mapping[str, str] | None = None,
) -> int:
    """Run `python COMMAND` as `num_processes` cooperating local processes; see module doc."""
    if num_processes < 1 or devices_per_process < 1:
        raise ValueError("num_processes and devices_per_process must be >= 1")
    if not command:
        raise ValueError("nothing to launch: give a script (and its arguments) after --")
    base = dict(os.environ if env is None else env)
    port = free_port()
    procs: list[subprocess.Popen] = []
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)  # a killed launcher cleans up
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        for i in range(num_processes):
            e = child_env(base, port=port, num_processes=num_processes, process_id=i,
                          devices=devices_per_process)
            procs.append(subprocess.Popen([sys.executable, *command], env=e))
        while True:
            codes = [p.poll() for p in procs]
            failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                i, code = failed[0]
                print(f"[launch] process {i} exited with {code}; stopping the others",
                      file=sys.stderr)
                return code if code > 0 else 128 - code
            if all(c == 0 for c in codes):
                return 0
            if deadline is not None and time.monotonic() > deadline:
                print(f"[launch] timed out after {timeout}s; stopping all", file=sys.stderr)
                return 124
            time.sleep(0.05)
    except KeyboardInterrupt:
        print("[launch] interrupted; stopping all", file=sys.stderr)
        return 130
    finally:
        _stop(procs)
        signal.signal(signal.SIGTERM, previous)


def add_launch_parser(subparsers) -> argparse.ArgumentParser:
    """Register `launch` on an argparse sub-parser set (for `fedjax-lm launch`)."""
    p = subparsers.add_parser(
        "launch", help="run a script as N local processes x D CPU devices (multi-host trial)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_arguments(p)
    return p


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-processes", type=int, default=2)
    p.add_argument("--devices-per-process", type=int, default=2)
    p.add_argument("--timeout", type=float, default=None, help="seconds; stop all after it")
    p.add_argument("command", nargs=argparse.REMAINDER,
                   help="-- then the script (or -m module) and its arguments")


def run_launch(args: argparse.Namespace) -> int:
    command = list(args.command)
    if command[:1] == ["--"]:
        command = command[1:]
    return launch(command, num_processes=args.num_processes,
                  devices_per_process=args.devices_per_process, timeout=args.timeout)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedjax_lm.scale.launch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(parser)
    return run_launch(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
