"""Why vmapped per-client convolutions are slow on XLA:CPU, and what is faster: one run, ratios.

Times the client step of pfl-research's CIFAR-10 CNN (`models/cnn.PflSimpleCnn`: 5 local SGD
steps of batch 10, the shape of its benchmark) for C clients with their own weights, four ways:

- `vmap/xla`: the engine's vectorized executor as is: JAX batches a conv whose kernel is
  batched into one grouped convolution (`feature_group_count` = C);
- `vmap/patches`: the same vmap, convolutions lowered as patches × matrix (`models/conv.py`):
  the window extraction folds the client axis into the batch, the per-client part is a batched
  matmul;
- `map/xla`, `map/patches`: clients one after another inside one program (`lax.map`, what the
  `vmap@1s` executor does), so each conv has one kernel.

Prints a table (ms a client, × the fastest) and writes it as JSON / markdown with `--out`.

    PYTHONPATH=. python benchmarks/conv_clients.py --clients 10 --reps 5 --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

from fedjax_lm.models.cnn import image_classification_loss, make_cnn_model


def client_update(loss_fn, opt):
    def run(params, batches, key):
        def step(carry, xs):
            p, s = carry
            batch, k = xs
            g = jax.grad(lambda q: loss_fn(q, batch, k)[0])(p)
            u, s = opt.update(g, s, p)
            return (optax.apply_updates(p, u), s), None

        steps = batches["label"].shape[0]
        (p, _), _ = jax.lax.scan(step, (params, opt.init(params)),
                                 (batches, jax.random.split(key, steps)))
        return p

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=10)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    c, s, b = args.clients, args.steps, args.batch_size
    keys = jax.random.split(jax.random.key(0), 3)
    data = {"image": jax.random.normal(keys[0], (c, s, b, 32, 32, 3)),
            "label": jax.random.randint(keys[1], (c, s, b), 0, 10),
            "mask": jnp.ones((c, s, b))}
    client_keys = jax.random.split(keys[2], c)
    rows = []
    for impl in ("patches", "xla"):  # the slow one last: what finishes is printed as it does
        model = make_cnn_model("pfl_cnn", 10, conv_impl=impl)
        params = jax.vmap(model.init)(jax.random.split(jax.random.key(1), c))
        update = client_update(image_classification_loss(model), optax.sgd(0.1))
        variants = {
            "vmap": jax.jit(jax.vmap(update)),
            "map": jax.jit(lambda p, d, k, u=update: jax.lax.map(lambda a: u(*a), (p, d, k))),
        }
        for name, fn in variants.items():
            print(f"{name}/{impl}: compiling and running ...", flush=True)
            t = time.perf_counter()
            jax.block_until_ready(fn(params, data, client_keys))
            compile_s = time.perf_counter() - t
            times = []
            for _ in range(args.reps):
                t = time.perf_counter()
                jax.block_until_ready(fn(params, data, client_keys))
                times.append(time.perf_counter() - t)
            rows.append({"variant": f"{name}/{impl}", "clients": c, "compile_s": compile_s,
                         "round_s": statistics.median(times), "times_s": times})
            print(f"{name}/{impl}: {1e3 * rows[-1]['round_s'] / c:.1f} ms a client "
                  f"(compile {compile_s:.1f}s)", flush=True)
    best = min(r["round_s"] for r in rows)
    lines = [f"pfl CNN client step, C = {c} clients × {s} steps × batch {b}, median of "
             f"{args.reps}; load average {os.getloadavg()[0]:.1f} at the end", "",
             "| variant | ms a client | × fastest | compile s |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {1e3 * r['round_s'] / c:.1f} | "
                     f"{r['round_s'] / best:.2f} | {r['compile_s']:.1f} |")
    print("\n".join(lines))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "conv_clients.json").write_text(json.dumps(
            {"rows": rows, "loadavg": os.getloadavg(), "jax": jax.__version__}, indent=1))
        (args.out / "conv_clients.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
