"""`fedjax-lm plan`: how much memory a round needs and which chunk width fits, without training.

    fedjax-lm plan --model base --clients 32 --device-memory 80GB --batch-size 32 \\
        --max-length 128 --local-steps 4 --optimizer adam [--remat] [--bf16]
    fedjax-lm plan --target h200 --model base --clients 32 --bf16 --largest-clients
    fedjax-lm plan --target h200 --model base --clients 2048 --batch-size 8 --peft lora \
        --lora-rank 8 --lora-targets query,value --largest-clients

Compiles the engine's chunk program from shapes only (see `memory`), for the local backend or,
with `--target`, for a GPU this machine need not have (see `targets`; needs JAX's CUDA plugin).
`--largest-clients` then compiles the unchunked program at growing C to find the most clients
one device holds: past the linear estimate XLA rematerializes, so more fit than it predicts.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import jax

from fedjax_lm.federated.client_optimizers import CLIENT_OPTIMIZERS, make_client_optimizer
from fedjax_lm.federated.robust import AGGREGATORS, ALIASES, WHOLE_COHORT
from fedjax_lm.federated.trainable import trainable_part
from fedjax_lm.scale import memory as mem
from fedjax_lm.scale import targets


def model_loss_and_params(name: str, model_type: str, num_labels: int, *, remat: bool,
                          bf16: bool, **lora):
    """`(loss_fn, params ShapeDtypeStructs)` of a size preset built as `model_type` (`tiny`,
    or `preset:tiny` as `train` spells it) or of any model `train` takes (`minilm`,
    `minilm-distil`, a folder, a Hub id), from its config.json alone: no weights are read.
    `lora`: the adapters' config fields. Imported lazily so planning works with whatever
    `fedjax_lm.models` provides."""
    from fedjax_lm import models

    fields = dict(remat=remat, dtype="bfloat16" if bf16 else "float32", **lora)
    size = name.removeprefix(models.PRESET_PREFIX)
    if size in models.PRESETS:
        config = models.preset(size, model_type, num_labels=num_labels, **fields)
    else:
        config = models.pretrained_config(name, num_labels, **fields)
    model = models.build_model(config)
    params = jax.eval_shape(model.init, jax.random.key(0))
    return models.classification_loss(model), params


def peft_pieces(args: argparse.Namespace) -> tuple[dict, object]:
    """(model LoRA fields, trainable-mask builder) for `--peft` (model-side, imported lazily)."""
    from fedjax_lm.federated import mask_from_predicate
    from fedjax_lm.models.peft import trainable_predicate

    lora = {}
    if args.peft == "lora":
        lora = dict(lora_rank=args.lora_rank, lora_targets=tuple(args.lora_targets.split(",")))
    pred = trainable_predicate(args.peft, freeze_layers=args.freeze_layers)
    return lora, (lambda params: None if pred is None else mask_from_predicate(params, pred))


def add_plan_parser(subparsers) -> argparse.ArgumentParser:
    """Register `plan` on an argparse sub-parser set (for `fedjax-lm plan`)."""
    p = subparsers.add_parser("plan", help="estimate round memory and choose clients_per_chunk",
                              description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(p)
    return p


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="base",
                   help="a size preset (tiny, mini, small, base) or any model train takes: "
                   "minilm, minilm-distil, a folder with config.json, a Hub id")
    p.add_argument("--model-type", default="bert",
                   help="bert, distilbert or albert (a size preset's architecture)")
    p.add_argument("--num-labels", type=int, default=2)
    p.add_argument("--clients", type=int, required=True, help="clients per round (cohort)")
    p.add_argument("--devices", type=int, default=1, help="devices sharing the clients")
    p.add_argument("--target", default="local",
                   help="compile for: local (this backend), a100, h100, h200, or a "
                   "GpuTargetConfig file (python -m fedjax_lm.scale.targets --dump FILE on a GPU)")
    p.add_argument("--device-memory", default=None,
                   help="per device, e.g. 80GB or 16GiB (default: the target's, else 80GB)")
    p.add_argument("--largest-clients", action="store_true",
                   help="also find the most clients one unchunked program fits (more compiles)")
    p.add_argument("--headroom", type=float, default=0.9, help="fraction of memory to plan for")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--local-steps", type=int, default=4)
    p.add_argument("--optimizer", choices=sorted(CLIENT_OPTIMIZERS), default="adam")
    p.add_argument("--remat", action="store_true", help="recompute layers in the backward pass")
    p.add_argument("--bf16", action="store_true", help="bfloat16 compute (float32 params)")
    p.add_argument("--aggregator", default="mean", choices=(*AGGREGATORS, *ALIASES),
                   help="a whole-cohort aggregator (median, krum, ...) gathers every message")
    p.add_argument("--peft", choices=("none", "lora", "head", "bitfit"), default="none",
                   help="parameter-efficient clients: only the trainable leaves are per client")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-targets", default="query,value")
    p.add_argument("--freeze-layers", type=int, default=0)


# Whole-number flags: (smallest value, what the flag gives; the fix names it).
_COUNTS = {
    "clients": (1, "the clients per round"),
    "devices": (1, "how many devices share the clients"),
    "batch_size": (1, "the examples per local step"),
    "max_length": (1, "the tokens per example"),
    "local_steps": (1, "the local steps per client and round"),
    "num_labels": (1, "the classes of the head"),
    "lora_rank": (1, "the rank of the LoRA adapters"),
    "freeze_layers": (0, "how many bottom layers to freeze (0: none)"),
}


def check_args(args: argparse.Namespace) -> int | None:
    """Refuse a flag that cannot describe a round, one line each, before anything compiles;
    the `--device-memory` bytes (None: the target's)."""
    from fedjax_lm.grid import ConfigError, check_counts

    check_counts(args, _COUNTS)
    if not 0 < args.headroom <= 1:
        raise ConfigError(f"--headroom is the fraction of memory to plan for, in (0, 1]; "
                          f"got {args.headroom}")
    if args.device_memory is None:
        return None
    try:
        return mem.parse_bytes(args.device_memory)
    except ValueError as e:
        raise ConfigError(f"--device-memory: {e}") from None


def plan_report(args: argparse.Namespace) -> tuple[mem.MemoryEstimate, list[str]]:
    """The estimate and the lines `run_plan` prints."""
    device_memory = check_args(args)
    target = targets.resolve_target(args.target)
    memory = device_memory or target.memory_bytes or mem.parse_bytes("80GB")
    memory_from = args.device_memory or (target.name if target.memory_bytes else "80GB")
    lora, make_mask = peft_pieces(args)
    loss_fn, params = model_loss_and_params(args.model, args.model_type, args.num_labels,
                                            remat=args.remat, bf16=args.bf16, **lora)
    trainable = make_mask(params)
    batch = mem.text_batch(args.local_steps, args.batch_size, args.max_length)
    optimizer = make_client_optimizer(args.optimizer, 1e-3)
    est = mem.estimate_memory(loss_fn, params, optimizer, batch, sharding=target.sharding,
                              trainable=trainable)
    budget = int(args.headroom * memory)
    per_device = -(-args.clients // args.devices)
    width = mem.widest_fitting(est, per_device, budget)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    f = mem.format_bytes
    lines = [
        f"model {args.model} ({args.model_type}): {n_params / 1e6:.1f}M params, "
        f"{f(est.params_bytes)}; remat={args.remat} bf16={args.bf16}",
        f"compiled for: {target.name} ({target.description})",
        f"client data: {args.local_steps} steps x {args.batch_size} examples x "
        f"{args.max_length} tokens = {f(est.data_bytes_per_client)} per client",
        f"peft {args.peft}: {f(mem.tree_bytes(trainable_part(trainable, params)))} trainable "
        f"per client, sent up and down each round (the frozen rest once)",
        f"per client: state {f(est.client_state_bytes)} (trainable params + {args.optimizer} "
        f"state + delta); compiled {f(est.per_client_bytes)} incl. gradients and "
        f"{f(est.activation_bytes_per_client)} activations",
        f"fixed per device: {f(est.fixed_bytes)} (server state, accumulator)",
        f"budget per device: {f(budget)} ({args.headroom:g} x {f(memory)} from {memory_from}); "
        f"{per_device} clients per device",
        f"unchunked: {per_device} clients need {f(est.chunk_bytes(per_device))}; "
        f"at most {est.max_clients(budget)} clients per device without chunking (linear)",
    ]
    aggregator = getattr(args, "aggregator", "mean")
    aggregator = ALIASES.get(aggregator, aggregator)
    if aggregator in WHOLE_COHORT:
        lines += whole_cohort_lines(est, aggregator, per_device, budget)
    elif width is None:
        lines.append(f"does not fit: one client needs {f(est.chunk_bytes(1))}")
    else:
        lines.append(
            f"clients_per_chunk: {width * args.devices} ({width} per device), round peak "
            f"{f(est.round_bytes(per_device, width))}; with chunks of {width}, up to "
            f"{est.max_clients(budget, width)} clients per device (data resident)"
        )
    if args.largest_clients:
        # The search compiles up to ~10 wide programs (minutes each on a loaded CPU): what is
        # known so far goes to stderr as it comes, so a plan stopped early still says it.
        print("\n".join(lines), file=sys.stderr, flush=True)

        def compile_bytes(c: int) -> int:
            size = mem.compiled_chunk_bytes(loss_fn, params, optimizer, batch, c,
                                            sharding=target.sharding, trainable=trainable)
            print(f"probe: C = {c} compiles to {f(size)} (linear {f(est.chunk_bytes(c))}, "
                  f"budget {f(budget)})", file=sys.stderr, flush=True)
            return size

        largest, probes = mem.largest_unchunked(compile_bytes, est, budget)
        lines.append(f"largest unchunked C (compiled): {largest} clients per device")
        lines.append("| C | compiled | linear estimate | fits | below linear |")
        lines.append("|---|---|---|---|---|")
        lines += [f"| {p.clients} | {f(p.compiled_bytes)} | {f(p.linear_bytes)} | "
                  f"{'yes' if p.compiled_bytes <= budget else 'no'} | "
                  f"{'yes' if p.below_linear else 'no'} |" for p in probes]
    return est, lines


def whole_cohort_lines(est: mem.MemoryEstimate, aggregator: str, clients: int,
                       budget: int) -> list[str]:
    """A whole-cohort aggregator cannot chunk: the round holds every client's message (a
    model-sized `[C, ...]` stack) at the reduce, and a sorting rule a sorted copy of it too."""
    copies = 2 if aggregator in ("median", "trimmed_mean") else 1
    gathered = copies * clients * est.params_bytes
    total = est.chunk_bytes(clients) + gathered
    f = mem.format_bytes
    return [f"aggregator {aggregator} needs every message at once: no clients_per_chunk; "
            f"+{f(gathered)} for the gathered [C, ...] messages ({copies} x {clients} x "
            f"{f(est.params_bytes)}), round about {f(total)}: "
            + ("fits" if total <= budget else "does not fit: fewer clients per device, or more "
               "devices (backend mesh)")]


def run_plan(args: argparse.Namespace) -> int:
    targets.use_cpu_platform_for(args.target)
    try:
        _, lines = plan_report(args)
    except ValueError as e:  # as `fedjax-lm` prints a ConfigError (also a ValueError)
        print(f"fedjax-lm plan: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedjax_lm.scale.plan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(parser)
    return run_plan(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
