"""Speed of the engine: rounds per backend × client count, FLOP/s vs a matmul roofline,
memory, compilations, and PyTorch peers (plain loop, Flower, pfl-research) on the same work.

`add_parsers(subparsers)` adds the `bench` subcommand to `fedjax-lm`; `run_bench(args)` runs it.
"""

from fedjax_lm.bench.run import FIELDS, add_parsers, run_bench

__all__ = ["FIELDS", "add_parsers", "run_bench"]
