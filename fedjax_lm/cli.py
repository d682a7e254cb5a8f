"""`fedjax-lm`: federated fine-tuning runs, sweeps, reports, benchmarks and planning.

Thin by design: parse flags into a typed config, then call the runner. Errors a user can
fix (bad config, missing data, unloadable model, a diverged run) are printed as one line
with exit status 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import typing
from pathlib import Path
from typing import Any

from fedjax_lm.runner import config as rc

QUICK_PRESET = Path(__file__).resolve().parents[1] / "experiments" / "quick.yaml"


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One `--field-name` flag per RunConfig field (values are validated by the config)."""
    parser.add_argument("--config", type=Path, help="a YAML preset from experiments/")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override any config field (repeatable)")
    group = parser.add_argument_group("config fields (override the preset)")
    for name, field in rc.FIELDS.items():
        types_ = [t for t in typing.get_args(rc._HINTS[name]) or (rc._HINTS[name],)
                  if t is not type(None)]
        group.add_argument(f"--{name.replace('_', '-')}", dest=f"field_{name}", default=None,
                           metavar=types_[0].__name__.upper(),
                           help=f"default: {field.default!r}")


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    out = rc.parse_overrides(args.set)
    for name in rc.FIELDS:
        value = getattr(args, f"field_{name}")
        if value is not None:
            out[name] = value
    return out


def _preset(args: argparse.Namespace) -> rc.Preset:
    if args.config is None:
        return rc.Preset(name="cli", base={}, grid={})
    return rc.load_preset(args.config)


def cmd_train(args: argparse.Namespace) -> int:
    from fedjax_lm.runner.train import train

    preset = _preset(args)
    if preset.grid:
        print(f"note: {args.config} defines a sweep over {', '.join(preset.grid)}; `train` "
              "runs its base config only (use `fedjax-lm sweep` for the grid)", file=sys.stderr)
    overrides = _overrides(args)
    cfg = rc.from_dict({**preset.base, **overrides})
    final = train(cfg, progress=not args.no_progress)
    print(f"final accuracy {final['final_accuracy']:.4f} (best {final['best_accuracy']:.4f}) "
          f"after {final['rounds']} rounds; results in {cfg.out}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from fedjax_lm.runner.sweep import run_sweep

    preset = _preset(args)
    overrides = _overrides(args)
    out = Path(overrides.pop("out", None) or args.out_dir or Path("runs") / preset.name)
    run_sweep(preset, overrides, out, progress=not args.no_progress, isolate=True)
    print((out / "summary.md").read_text())
    print(f"results: {out}/results.csv; plots: {out}/accuracy_vs_round.png, "
          f"{out}/final_accuracy_vs_clients.png")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from fedjax_lm.runner.report import write_report

    summary = write_report(args.dir, title=args.title or "")
    print(summary.read_text())
    return 0


def cmd_quick(args: argparse.Namespace) -> int:
    """`make run`: the quick sweep on MiniLM, on IMDB when a data dir is configured."""
    data_dir = args.data_dir or os.environ.get("FEDJAX_LM_DATA_DIR")
    preset = rc.load_preset(QUICK_PRESET)
    overrides: dict[str, Any] = {}
    if data_dir:
        overrides = {"task": "imdb", "data_dir": data_dir}
        print(f"quick run: IMDB from {data_dir}")
    else:
        overrides = {"task": "synthetic"}
        print("quick run: no data directory configured (--data-dir or FEDJAX_LM_DATA_DIR), "
              "so this uses the generated `synthetic` task instead of IMDB")
    out = Path(args.out_dir or "runs/quick")
    from fedjax_lm.runner.sweep import run_sweep

    run_sweep(preset, overrides, out, progress=not args.no_progress, isolate=True)
    print((out / "summary.md").read_text())
    print(f"plots: {out}/accuracy_vs_round.png, {out}/final_accuracy_vs_clients.png")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedjax-lm", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  fedjax-lm train --task imdb --data-dir ../shared/data --clients 4 --rounds 3\n"
               "  fedjax-lm sweep --config experiments/paper1_cpu.yaml\n"
               "  fedjax-lm report runs/paper1_cpu",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="one federated run (resumes if its --out has a checkpoint)")
    _add_config_flags(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sweep", help="the grid of a preset; reruns skip finished cells")
    _add_config_flags(p)
    p.add_argument("--out-dir", type=Path, help="sweep folder (default runs/<preset name>)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("report", help="results.csv, summary.md and plots from finished runs")
    p.add_argument("dir", type=Path, help="a folder of run directories (e.g. a sweep's)")
    p.add_argument("--title", help="heading of summary.md")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("quick", help="what `make run` runs: a small client-count sweep")
    p.add_argument("--data-dir", help="dataset folder (else $FEDJAX_LM_DATA_DIR)")
    p.add_argument("--out-dir", type=Path)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_quick)

    from fedjax_lm.scale.launch import add_launch_parser, run_launch
    from fedjax_lm.scale.plan import add_plan_parser, run_plan

    add_plan_parser(sub).set_defaults(func=run_plan)
    add_launch_parser(sub).set_defaults(func=run_launch)

    from fedjax_lm.bench import add_parsers as add_bench_parsers
    from fedjax_lm.personalize.cli import add_parsers as add_personalize_parsers

    add_personalize_parsers(sub)
    add_bench_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from fedjax_lm.data import DataError
    from fedjax_lm.models import ModelLoadError
    from fedjax_lm.runner.train import TrainingError

    args = build_parser().parse_args(argv)
    try:
        if args.command in ("train", "sweep", "quick"):
            from fedjax_lm.scale.distributed import DistributedConfig, maybe_initialize_distributed

            # Joins a multi-process run when the environment says so (FEDJAX_LM_* variables,
            # SLURM with several tasks, a TPU pod); a no-op on one machine.
            maybe_initialize_distributed(DistributedConfig.from_env())
        return args.func(args)
    except (rc.ConfigError, DataError, ModelLoadError, TrainingError, FileNotFoundError) as e:
        print(f"fedjax-lm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fedjax-lm {args.command}: interrupted; rerun the same command to resume "
              "from the last checkpoint", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
