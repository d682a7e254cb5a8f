"""Run the PyTorch peer harnesses (benchmarks/peers/*.py) in the separate peers venv.

Peers live in their own venv (torch, flwr, ray, pfl must not enter ours), so each is a
subprocess with a timeout that prints one JSON line. Any failure — no venv, an import error,
a crash, a timeout — becomes a row with `status: failed`, the reason and the stderr tail, and
the bench goes on.

A peer is compared at its best: `peer_settings` is the small sweep of its knobs (Flower: Ray
actors × torch threads per actor; pfl-research and the plain loop: torch threads) that the bench
runs, and the comparison takes each peer's fastest setting.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
PEERS_DIR = REPO / "benchmarks" / "peers"
PEER_SCRIPTS = {"torch-loop": "torch_loop.py", "flower": "flower_sim.py", "pfl": "pfl_sim.py"}
PEERS = tuple(PEER_SCRIPTS)


def peer_settings(peer: str, cores: int) -> tuple[dict[str, int], ...]:
    """The settings a peer is swept over on a machine with `cores` CPUs.

    Flower: Ray actors ∈ {1, cores} (each actor asks Ray for cores/actors CPUs) × torch threads
    per actor ∈ {1, cores}. pfl-research: one process with 1 or `cores` threads, or `cores`
    worker processes (torchrun) of one thread each. The plain loop: torch threads.
    """
    counts = sorted({1, max(cores, 1)})
    if peer == "flower":
        return tuple({"actors": a, "threads": t} for a in counts for t in counts)
    if peer == "pfl":
        many = ({"workers": cores, "threads": 1},) if cores > 1 else ()
        return tuple({"workers": 1, "threads": t} for t in counts) + many
    return tuple({"threads": t} for t in counts)


def setting_label(setting: dict[str, int] | None) -> str:
    """`actors=2,threads=1`; empty for the peer's defaults."""
    return ",".join(f"{k}={v}" for k, v in (setting or {}).items())


def peers_python() -> Path:
    """The peers venv's python: $FEDJAX_LM_PEERS_PYTHON, else <repo>/.venv-peers/bin/python."""
    env = os.environ.get("FEDJAX_LM_PEERS_PYTHON")
    return Path(env) if env else REPO / ".venv-peers" / "bin" / "python"


def run_peer(
    peer: str,
    config: dict[str, Any],
    *,
    clients: int,
    rounds: int,
    local_steps: int,
    batch_size: int,
    max_length: int,
    optimizer: str,
    timeout_s: float,
    python: Path | None = None,
    setting: dict[str, int] | None = None,
) -> dict[str, Any]:
    """One peer cell: its JSON result, or `{"status": "failed", "error": ..., ...}`.
    `setting` (see `peer_settings`) becomes the script's `--actors` / `--workers` / `--threads`
    flags."""
    python = python or peers_python()
    base: dict[str, Any] = {"peer": peer, "clients": clients, "setting": setting_label(setting)}
    if peer not in PEER_SCRIPTS:
        return {**base, "status": "failed", "error": f"unknown peer {peer!r}; known: {PEERS}"}
    if not python.exists():
        return {**base, "status": "failed",
                "error": f"peers venv python not found at {python}: create it with "
                         "`python3 -m venv .venv-peers && .venv-peers/bin/pip install "
                         "torch==2.13.0 'flwr[simulation]==1.42.*' 'ray==2.55.*' pfl==0.6.0 "
                         "transformers==5.24.0 numpy psutil`"}
    args = ["--config-json", json.dumps(config), "--clients", str(clients), "--rounds",
            str(rounds), "--local-steps", str(local_steps), "--batch-size", str(batch_size),
            "--max-length", str(max_length), "--optimizer", optimizer]
    args += [f"--{k}={v}" for k, v in (setting or {}).items()]
    return run_peer_script(PEER_SCRIPTS[peer], args, base, timeout_s, python)


def run_peer_script(script: str, args: list[str], base: dict[str, Any], timeout_s: float,
                    python: Path) -> dict[str, Any]:
    """Run `benchmarks/peers/<script>` in the peers venv; its last JSON line merged over
    `base` with `status: ok`, or `base` with `status: failed`, the reason and stderr's tail."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
    try:
        proc = subprocess.run([str(python), str(PEERS_DIR / script), *args], capture_output=True,
                              text=True, timeout=timeout_s, cwd=PEERS_DIR, env=env)
    except subprocess.TimeoutExpired as e:
        return {**base, "status": "failed", "error": f"timed out after {timeout_s:.0f} s",
                "stderr_tail": _tail(e.stderr)}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {**base, "status": "failed", "error": f"exit status {proc.returncode}",
                "stderr_tail": _tail(proc.stderr)}
    try:
        return {**json.loads(lines[-1]), **base, "status": "ok"}
    except json.JSONDecodeError as e:
        return {**base, "status": "failed", "error": f"bad JSON from peer: {e}",
                "stderr_tail": _tail(proc.stderr)}


def _tail(text: str | bytes | None, lines: int = 15) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return "\n".join((text or "").splitlines()[-lines:])


if __name__ == "__main__":  # a manual check: python -m fedjax_lm.bench.peers torch-loop
    from fedjax_lm.bench.workload import Workload, encoder_config, peer_config

    print(run_peer(sys.argv[1], peer_config(encoder_config(Workload())), clients=2, rounds=2,
                   local_steps=4, batch_size=8, max_length=32, optimizer="sgd", timeout_s=300))
