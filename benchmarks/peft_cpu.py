"""LoRA clients vs full fine-tuning, measured in one run (issue 16's CPU target).

    PYTHONPATH=. python benchmarks/peft_cpu.py --clients 256 --chunk 16 --out DIR

MiniLM (pretrained, `--model minilm`), Adam, S local steps x batch B x length L of random tokens;
LoRA R on the `--targets` projections vs every parameter trained, same C and chunking (the
vectorized engine, chunks by the `--executor`: `host` dispatches one compiled chunk step per
chunk, so a one-chunk round compiles it and the C-client round reuses it). Each variant runs in
its own process (its peak RSS is its own): a one-chunk round to compile, a timed one-chunk round
(written first, `one_chunk_s`: the fallback when the C-client round cannot finish in the time
at hand), then `--rounds` timed C-client rounds. Each child writes `DIR/row_<variant>.json`;
the parent writes `DIR/peft_cpu.json` and `DIR/peft_cpu.md` (`--report` rebuilds them from the
rows already there): client-steps per second, compiled per-client bytes
(XLA's memory analysis of the chunk program at two widths: the memory one more client adds to
an unchunked round, i.e. carried state, gradients and activations; and its activation part),
each client's carried state (trainable params + Adam + delta), the bytes a client sends per
round, peak RSS, and the LoRA / full ratios. `--remat` recomputes each encoder layer in the
backward pass (both variants); `--parallel` runs the two children at the same time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path


def measure(args: argparse.Namespace) -> dict:
    import jax
    import numpy as np
    import optax

    from fedjax_lm import federated as fl
    from fedjax_lm import models
    from fedjax_lm.federated.trainable import count
    from fedjax_lm.models.peft import trainable_predicate
    from fedjax_lm.scale import memory as mem

    lora = args.variant == "lora"
    extra = dict(lora_rank=args.rank, lora_targets=tuple(args.targets.split(","))) if lora else {}
    loaded = models.from_pretrained(args.model, 2, load_tokenizer=False, remat=args.remat,
                                    **extra)
    params = loaded.params
    pred = trainable_predicate("lora" if lora else "none")
    mask = None if pred is None else fl.mask_from_predicate(params, pred)
    loss_fn = models.classification_loss(loaded.model)
    algorithm = fl.fedavg(loss_fn, optax.adam(1e-4), trainable=mask)
    engine = fl.FederatedEngine(algorithm, fl.ExecutorConfig(clients_per_chunk=args.chunk,
                                                             chunk_executor=args.executor))
    rs = np.random.RandomState(0)
    shape = (args.clients, args.steps, args.batch, args.length)
    data = {"input_ids": rs.randint(1, loaded.config.vocab_size, shape).astype(np.int32),
            "attention_mask": np.ones(shape, np.int32),
            "token_type_ids": np.zeros(shape, np.int32),
            "label": rs.randint(0, 2, shape[:3]).astype(np.int32),
            "mask": np.ones(shape[:3], np.float32)}
    state = engine.init(params, jax.random.key(0))

    def timed_round(state, clients):
        t0 = time.perf_counter()
        state = engine.run_round(state, jax.tree.map(lambda x: x[:clients], data)).state
        jax.block_until_ready(state.params)
        return state, time.perf_counter() - t0

    state, first = timed_round(state, args.chunk)  # compiles the chunk step
    state, one_chunk = timed_round(state, args.chunk)
    batch = mem.text_batch(args.steps, args.batch, args.length)
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    est = mem.estimate_memory(loss_fn, shapes, optax.adam(1e-4), batch, trainable=mask,
                              widths=(1, 2))
    trainable, total = count(mask, params)
    remat = {}
    if args.estimate_remat and not args.remat:  # the same program with per-layer remat
        remat_loss = models.classification_loss(models.Model(loaded.config.replace(remat=True)))
        est_r = mem.estimate_memory(remat_loss, shapes, optax.adam(1e-4), batch, trainable=mask,
                                    widths=(1, 2))
        remat = {"remat_compiled_per_client_bytes": est_r.per_client_bytes,
                 "remat_compiled_fixed_bytes": est_r.fixed_bytes}
    row = {"variant": args.variant, "clients": args.clients, "chunk": args.chunk,
           "executor": args.executor, "first_round_s": first, "one_chunk_s": one_chunk,
           "one_chunk_client_steps_per_s": args.chunk * args.steps / one_chunk,
           "remat": args.remat,
           "compiled_per_client_bytes": est.per_client_bytes,
           "activation_bytes_per_client": est.activation_bytes_per_client,
           "compiled_fixed_bytes": est.fixed_bytes,
           "data_bytes_per_client": est.data_bytes_per_client,
           "client_state_bytes": est.client_state_bytes, **remat,
           "upload_bytes_per_client": trainable, "param_bytes": total,
           "one_chunk_peak_rss_bytes": peak_rss(), "loadavg": os.getloadavg()}
    # Written before the C-client round: what is left if that round cannot finish in time.
    (args.out / f"row_{args.variant}.json").write_text(json.dumps(row, indent=1))
    print(json.dumps(row), flush=True)
    times = []
    for _ in range(args.rounds):
        state, seconds = timed_round(state, args.clients)
        times.append(seconds)
    round_s = min(times)
    return {**row, "round_s": round_s,
            "client_steps_per_s": args.clients * args.steps / round_s,
            "peak_rss_bytes": peak_rss(), "loadavg": os.getloadavg()}


def peak_rss() -> int:
    """This process's peak resident set so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", choices=("lora", "full"), help=argparse.SUPPRESS)
    p.add_argument("--model", default="minilm")
    p.add_argument("--clients", type=int, default=256)
    p.add_argument("--chunk", type=int, default=16)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=64)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--targets", default="query,value")
    p.add_argument("--executor", choices=("host", "scan"), default="host")
    p.add_argument("--rounds", type=int, default=1, help="timed C-client rounds")
    p.add_argument("--remat", action="store_true", help="recompute each layer in the backward")
    p.add_argument("--estimate-remat", action="store_true",
                   help="also XLA's per-client bytes of the same program with remat")
    p.add_argument("--parallel", action="store_true",
                   help="run the variants' children at the same time (they see the same load)")
    p.add_argument("--variants", default="full,lora", help="children to run, in this order")
    p.add_argument("--report", action="store_true", help="only rebuild the tables from rows")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/peft-cpu"))
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.variant:  # a child: one variant, its row as JSON in DIR/row_<variant>.json
        row = measure(args)
        (args.out / f"row_{args.variant}.json").write_text(json.dumps(row, indent=1))
        print(json.dumps(row))
        return
    if not args.report:
        argv = [a for a in sys.argv[1:] if a != "--parallel"]
        children = [[sys.executable, __file__, *argv, "--variant", v]
                    for v in args.variants.split(",")]
        if args.parallel:
            procs = [subprocess.Popen(c) for c in children]
            if any(p.wait() for p in procs):
                sys.exit("a variant's child failed")
        else:
            for c in children:
                subprocess.run(c, check=True)
    rows = {v: json.loads((args.out / f"row_{v}.json").read_text()) for v in ("full", "lora")}
    full, lora = rows["full"], rows["lora"]
    names = ("client_steps_per_s", "one_chunk_client_steps_per_s", "compiled_per_client_bytes",
             "activation_bytes_per_client", "remat_compiled_per_client_bytes",
             "client_state_bytes", "upload_bytes_per_client", "peak_rss_bytes",
             "one_chunk_peak_rss_bytes")
    # A key missing from a row (its C-client round did not finish) has no ratio.
    ratios = {f"{k} (lora / full)": lora[k] / full[k] for k in names if k in lora and k in full}
    keys = [k for k in dict.fromkeys([*full, *lora]) if k not in ("variant", "loadavg", "executor")]
    lines = [f"# LoRA (R={args.rank}, {args.targets}) vs full fine-tuning, {args.model}, Adam, "
             f"{args.steps} steps x batch {args.batch} x length {args.length}, C={args.clients}, "
             f"chunks of {args.chunk}, remat={full.get('remat', False)}", "",
             "| | full | lora |", "|---|---|---|"]
    cell = lambda row, k: f"{row[k]:.4g}" if k in row else "-"  # noqa: E731
    lines += [f"| {k} | {cell(full, k)} | {cell(lora, k)} |" for k in keys]
    lines += ["", "| ratio | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4g} |" for k, v in ratios.items()]
    lines += ["", f"load average (full, lora): {full['loadavg']}, {lora['loadavg']}"]
    (args.out / "peft_cpu.json").write_text(json.dumps({"rows": rows, "ratios": ratios},
                                                       indent=1))
    (args.out / "peft_cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
