"""`fedjax-lm moe` / `fedjax-lm abu`: the personalisation and ABU experiments.

The main CLI wires these in with `add_parsers(subparsers)`; each subcommand's handler is stored
as `args.func` and returns an exit code.
"""

from __future__ import annotations

import argparse
from typing import Any


def add_parsers(subparsers: Any) -> None:
    """Add the `moe` and `abu` subcommands (each: --config, --out, --data-dir, --smoke)."""
    from fedjax_lm.personalize import abu, moe

    p = subparsers.add_parser("moe", help="paper 2: local / FedAvg / fine-tuned / mixture of "
                              "experts (experiments/moe_*.yaml)")
    moe.add_arguments(p)
    p.set_defaults(func=lambda args: moe.run_from_args(args, _argv(args, "moe")))
    p = subparsers.add_parser("abu", help="paper 3: Adaptive Blending Units "
                              "(experiments/abu_*.yaml)")
    abu.add_arguments(p)
    p.set_defaults(func=lambda args: abu.run_from_args(args, _argv(args, "abu")))


def _argv(args: argparse.Namespace, name: str) -> list[str]:
    """The options as typed, for the command recorded in meta.json."""
    out = ["--config", args.config]
    if args.out:
        out += ["--out", args.out]
    if args.data_dir:
        out += ["--data-dir", args.data_dir]
    if args.smoke:
        out.append("--smoke")
    if getattr(args, "report_only", False):
        out.append("--report-only")
    if getattr(args, "work_dir", None):
        out += ["--work-dir", args.work_dir]
    return out
