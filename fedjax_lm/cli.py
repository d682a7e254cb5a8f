"""`fedjax-lm`: federated fine-tuning runs, sweeps, reports, benchmarks and planning.

Thin by design: parse flags into a typed config, then call the runner. Errors a user can
fix (bad config or flag, missing or damaged file, unloadable model, a folder that cannot be
written, a diverged run) are printed as one line with exit status 2, never as a traceback;
Ctrl-C is one line and exit status 130 at any point (fedjax_lm.entry: imports are lazy, inside
the handler; writes in flight finish first: fedjax_lm.interrupts).
"""

from __future__ import annotations

import argparse
import os
import sys
import typing
from pathlib import Path
from typing import Any

from fedjax_lm.entry import Invocation, OneLineParser

QUICK_PRESET = Path(__file__).resolve().parents[1] / "experiments" / "quick.yaml"


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One `--field-name` flag per RunConfig field (values are validated by the config)."""
    from fedjax_lm.runner import config as rc

    parser.add_argument("--config", type=Path, help="a YAML preset from experiments/")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override any config field (repeatable)")
    group = parser.add_argument_group("config fields (override the preset)")
    for name, field in rc.FIELDS.items():
        types_ = [t for t in typing.get_args(rc.HINTS[name]) or (rc.HINTS[name],)
                  if t is not type(None)]
        many = typing.get_origin(types_[0]) is tuple
        group.add_argument(f"--{name.replace('_', '-')}", dest=f"field_{name}", default=None,
                           metavar="A,B,..." if many else types_[0].__name__.upper(),
                           help=f"default: {field.default!r}")


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    from fedjax_lm.grid import ConfigError
    from fedjax_lm.runner.config import FIELDS
    from fedjax_lm.runner.presets import parse_overrides

    out = parse_overrides(args.set)
    for name in FIELDS:
        value = getattr(args, f"field_{name}")
        if value is not None:
            if name in out:
                raise ConfigError(f"{name} is set twice (--set {name}=... and "
                                  f"--{name.replace('_', '-')}): keep one")
            out[name] = value
    return out


def _preset(args: argparse.Namespace) -> Any:
    from fedjax_lm.runner.presets import Preset, load_preset

    if args.config is None:
        return Preset(name="cli", base={}, grid={})
    return load_preset(args.config)


def check_out_dir(path: str | Path, flag: str = "--out") -> None:
    """An output folder that cannot be a writable folder: one line now, naming the flag, rather
    than an OSError once the run has started."""
    from fedjax_lm.grid import ConfigError

    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{flag} {path} is a file, not a folder; choose another {flag}")
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{flag} {path} lies under a file ({existing}); choose another {flag}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {path} cannot be written ({existing} is not writable); "
                          f"choose another {flag} or fix the permissions")


def check_paths(cfg: Any) -> None:
    """What a run reads and writes outside its config: the output, cache and data folders, the
    user's files and an earlier run's files in `out`; one line before the run directory is
    touched, not an error once setup has begun."""
    from fedjax_lm.data import TASKS
    from fedjax_lm.data.sources import require_file, resolve_cache_dir, resolve_data_dir
    from fedjax_lm.runner.report import check_run_files

    check_out_dir(cfg.out)
    check_run_files(Path(cfg.out))
    resolve_cache_dir()
    if TASKS[cfg.task].needs_data:
        resolve_data_dir(cfg.data_dir)
    for file in (cfg.train_file, cfg.test_file) if cfg.task == "csv" else ():
        if file is not None:
            require_file(Path(file).expanduser())


def cmd_train(args: argparse.Namespace) -> int:
    from fedjax_lm.runner.checks import check_given_used, from_dict
    from fedjax_lm.runner.train import train

    preset = _preset(args)
    if preset.grid:
        print(f"note: {args.config} defines a sweep over {', '.join(preset.grid)}; `train` "
              "runs its base config only (use `fedjax-lm sweep` for the grid)", file=sys.stderr)
    overrides = _overrides(args)
    cfg = from_dict({**preset.base, **overrides})
    check_given_used(cfg, list(overrides))
    check_paths(cfg)
    final = train(cfg, progress=not args.no_progress)
    print(f"final accuracy {final['final_accuracy']:.4f} (best {final['best_accuracy']:.4f}) "
          f"after {final['rounds']} rounds; results in {cfg.out}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from fedjax_lm.runner.sweep import run_sweep

    preset = _preset(args)
    overrides = _overrides(args)
    flag = "--out" if overrides.get("out") else "--out-dir"
    out = Path(overrides.pop("out", None) or args.out_dir or Path("runs") / preset.name)
    check_out_dir(out, flag)
    vectorize = preset.vectorize
    if args.vectorize or args.vectorize_padding or args.vectorize_memory:
        vectorize = vectorize.replace(
            enabled=True, **{k: v for k, v in (("padding", args.vectorize_padding),
                                               ("memory", args.vectorize_memory)) if v})
    run_sweep(preset, overrides, out, progress=not args.no_progress, isolate=True,
              vectorize=vectorize)
    print((out / "summary.md").read_text())
    print(f"results: {out}/results.csv; plots: {out}/accuracy_vs_round.png, "
          f"{out}/final_accuracy_vs_clients.png")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from fedjax_lm.runner.report import write_report

    summary = write_report(args.dir, title=args.title or "")
    print(summary.read_text())
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from fedjax_lm.runner.export import export_run

    check_out_dir(args.merged, "--merged")
    rounds, out = export_run(args.dir, args.merged)
    print(f"exported round {rounds} of {args.dir} to {out} (adapters merged)")
    return 0


def cmd_quick(args: argparse.Namespace) -> int:
    """`make run`: the quick sweep on MiniLM, on IMDB when a data dir is configured."""
    from fedjax_lm.runner.presets import load_preset

    data_dir = args.data_dir or os.environ.get("FEDJAX_LM_DATA_DIR")
    preset = load_preset(QUICK_PRESET)
    overrides: dict[str, Any] = {}
    if data_dir:
        overrides = {"task": "imdb", "data_dir": data_dir}
        print(f"quick run: IMDB from {data_dir}")
    else:
        overrides = {"task": "synthetic"}
        print("quick run: no data directory configured (--data-dir or FEDJAX_LM_DATA_DIR), "
              "so this uses the generated `synthetic` task instead of IMDB")
    out = Path(args.out_dir or "runs/quick")
    check_out_dir(out, "--out-dir")
    from fedjax_lm.runner.sweep import run_sweep

    run_sweep(preset, overrides, out, progress=not args.no_progress, isolate=True)
    print((out / "summary.md").read_text())
    print(f"plots: {out}/accuracy_vs_round.png, {out}/final_accuracy_vs_clients.png")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
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
    p.add_argument("--vectorize", action="store_true",
                   help="cells differing only in seed, lr, server_lr, clients, cohort_size, "
                        "partition (alpha, p, k, beta) run as one program (a preset's "
                        "`vectorize: true` does the same)")
    p.add_argument("--vectorize-padding", type=float, metavar="X",
                   help="most padded work per real work a shared program may do (default 1.5)")
    p.add_argument("--vectorize-memory", metavar="SIZE",
                   help="memory one vectorized program may take, e.g. 8GiB (default: 90%% of "
                        "the device's, half the host's available RAM on a CPU)")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("report", help="results.csv, summary.md and plots from finished runs")
    p.add_argument("dir", type=Path, help="a folder of run directories (e.g. a sweep's)")
    p.add_argument("--title", help="heading of summary.md")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("export", help="a run's model as a Hugging Face folder (LoRA merged)")
    p.add_argument("dir", type=Path, help="a run directory (train's --out)")
    p.add_argument("--merged", type=Path, required=True,
                   help="output folder: config.json + model.safetensors + tokenizer")
    p.set_defaults(func=cmd_export)

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
    """The `fedjax-lm` command; the exit status. Without `argv` (the installed script,
    `python -m fedjax_lm.cli`) it owns the process."""
    from fedjax_lm.entry import run_command

    return run_command(lambda invocation: _main(argv, invocation), "fedjax-lm",
                       owns_process=argv is None)


def _main(argv: list[str] | None, invocation: Invocation) -> int:
    args = build_parser().parse_args(argv)
    # a sweep runs each cell as `fedjax-lm train`; its errors then name the sweep and cell
    from fedjax_lm.grid import CELL_ENV

    cell = os.environ.get(CELL_ENV)
    invocation.prog = f"fedjax-lm sweep: cell {cell}" if cell else f"fedjax-lm {args.command}"
    invocation.resumable = args.command in ("train", "sweep", "quick")
    if invocation.resumable:
        from fedjax_lm.scale.distributed import DistributedConfig, maybe_initialize_distributed

        # Joins a multi-process run when the environment says so (FEDJAX_LM_* variables,
        # SLURM with several tasks, a TPU pod); a no-op on one machine.
        maybe_initialize_distributed(DistributedConfig.from_env())
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
