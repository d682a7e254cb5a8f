"""Shared by the peer harnesses: flags, the same BERT in PyTorch, synthetic data, one JSON line.

Every peer trains `BertForSequenceClassification` built from the bench's `peer_config` (the same
architecture and size as our encoder, random init), C clients × S local SGD/Adam steps × batch B
of random token ids, all clients every round, FedAvg weighted by examples. Timings are per round
(median of the steady rounds after one warm-up round), so they compare with our `round_s`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config-json", required=True, help="BertConfig fields as JSON")
    p.add_argument("--clients", type=int, required=True)
    p.add_argument("--rounds", type=int, default=5, help="steady rounds after one warm-up")
    p.add_argument("--local-steps", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=32)
    p.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: every core; Flower: per actor, "
                        "default cores / actors)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


_PER_PROCESS: dict[str, Any] = {}


def per_process(key: str, build: Any) -> Any:
    """`build()` once per process, then the same object (a Ray actor's model and data)."""
    if key not in _PER_PROCESS:
        _PER_PROCESS[key] = build()
    return _PER_PROCESS[key]


def setup_torch(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    torch.manual_seed(args.seed)


def build_model(args: argparse.Namespace) -> Any:
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(**json.loads(args.config_json))
    model = BertForSequenceClassification(cfg)
    model.train()
    return model


def make_optimizer(args: argparse.Namespace, params: Any) -> Any:
    import torch

    if args.optimizer == "sgd":
        return torch.optim.SGD(params, lr=args.lr or 0.01)
    return torch.optim.Adam(params, lr=args.lr or 1e-4)


def client_data(args: argparse.Namespace, vocab_size: int) -> list[list[dict[str, Any]]]:
    """data[c][s] = one batch {input_ids, attention_mask, token_type_ids, labels}."""
    import torch

    g = torch.Generator().manual_seed(args.seed)
    shape = (args.clients, args.local_steps, args.batch_size, args.max_length)
    ids = torch.randint(0, vocab_size, shape, generator=g)
    labels = torch.randint(0, 2, shape[:3], generator=g)
    ones = torch.ones(shape[3:], dtype=torch.long)
    return [
        [
            {
                "input_ids": ids[c, s],
                "attention_mask": ones.expand(args.batch_size, -1),
                "token_type_ids": torch.zeros_like(ids[c, s]),
                "labels": labels[c, s],
            }
            for s in range(args.local_steps)
        ]
        for c in range(args.clients)
    ]


def summarize(peer: str, times: list[float], args: argparse.Namespace, **extra: Any) -> dict:
    """First round = warm-up; the median of the rest is the steady round time."""
    steady = times[1:] or times
    import torch

    return {
        "peer": peer,
        "clients": args.clients,
        "first_round_s": times[0],
        "round_s": statistics.median(steady),
        "round_times_s": steady,
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "loadavg": os.getloadavg(),
        "peak_mem_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        **extra,
    }


def emit(result: dict) -> None:
    """The one JSON line the bench parses (last line of stdout)."""
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()


class Timer:
    def __enter__(self) -> Timer:
        self.t = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.s = time.perf_counter() - self.t


def pfl_workers_or_relaunch(script: str) -> list[str]:
    """`--workers W` (W > 1) outside torchrun: run `script` as W processes of one pfl
    simulation under torchrun (it sets the env pfl's `torch.distributed` context reads; gloo on
    a CPU) and exit with its status. Otherwise the other flags, for the script's parser."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--workers", type=int, default=1)
    extra, rest = p.parse_known_args()
    if extra.workers > 1 and "TORCHELASTIC_RUN_ID" not in os.environ:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={extra.workers}", script, *rest]
        sys.exit(subprocess.run(cmd, check=False).returncode)
    return rest


def init_ray(cpus: int, tries: int = 4) -> dict[str, Any]:
    """Start Ray here, retrying: Ray 2.55 gives its raylet a hard-coded 30 s to register, which
    a loaded machine can miss ("The current node timed out during startup"). Returns the
    `ray_init_args` for Flower's `start_simulation` (with `keep_initialised=True`)."""
    import ray

    args = {"num_cpus": cpus, "include_dashboard": False, "log_to_driver": False,
            "ignore_reinit_error": True}
    for attempt in range(tries):
        try:
            ray.init(**args)
            return args
        except Exception as e:  # noqa: BLE001 — Ray raises a bare Exception here
            if "timed out during startup" not in str(e) or attempt == tries - 1:
                raise
            sys.stderr.write(f"ray start timed out (attempt {attempt + 1}); retrying\n")
            ray.shutdown()
    return args
