"""The `fedjax-lm` command line (thin: parse, then call the runner or the benchmarks)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedjax-lm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run-quick", help="the quick client-count sweep that `make run` runs")
    args = parser.parse_args(argv)
    if args.command == "run-quick":
        print("fedjax-lm: the client-count sweep runner has not landed yet (issue 5); "
              "see README for the engine example.")
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
