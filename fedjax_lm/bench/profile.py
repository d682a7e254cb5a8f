"""Where a client step's time goes: ablations of one local step, timed in one process.

`python -m fedjax_lm.bench.profile --model mini --out DIR` times the engine's client step (one
client, S local SGD steps in one jitted `lax.scan`) and variants that each remove or isolate
one cost: dropout's random bits, the exact (erf) GELU, the backward pass, everything that is not
a dense matmul, the dense embedding-table update, and the same step vmapped over C clients. The
differences say what limits a cell when it misses the roofline: matmul shapes too small for the
CPU's kernels, elementwise / memory-bound work, or per-op overhead. Each variant's XLA cost
analysis (FLOPs, bytes accessed) is reported beside its time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lm import federated as fl
from fedjax_lm.bench.measure import client_optimizer, matmul_roofline
from fedjax_lm.bench.workload import Workload, encoder_config, synthetic_data, train_flops_per_token
from fedjax_lm.io import atomic_write_text
from fedjax_lm.models import EncoderConfig, Model, classification_loss


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    why: str
    fn: Callable[..., Any]  # jitted
    args: tuple[Any, ...]
    clients: float = 1  # time is divided by this (per-client cost; 1/S: one step of S)
    useful_flops: float = 1.0  # its share of the training step's matmul FLOPs (forward: 1/3)
    donates: bool = False  # its first argument is donated: feed the output back in


def dense_matmul_step(cfg: EncoderConfig, batch: int, length: int) -> tuple[Callable, tuple]:
    """Only the matmuls of one training step, at the model's shapes: per layer the six dense
    products forward plus their two gradients each, and the four attention batched products
    (QKᵀ, probs·V forward; two gradients each). Its FLOPs equal `train_flops_per_token` × tokens,
    so its speed is the ceiling for this model's shapes on this machine."""
    h, i, heads = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads
    d, t = h // heads, batch * length
    rs = np.random.RandomState(0)

    def arr(*shape: int) -> jax.Array:
        return jnp.asarray(rs.standard_normal(shape).astype(np.float32) * 0.02)

    # (input, weight): Q, K, V, output projections on [t, h]; FFN in on [t, h], out on [t, i].
    x, xi = arr(t, h), arr(t, i)
    weights = [arr(h, h) for _ in range(4)] + [arr(h, i), arr(i, h)]
    q = arr(batch * heads, length, d)
    p = arr(batch * heads, length, length)

    def step(x, xi, weights, q, p):
        total = jnp.zeros((), jnp.float32)
        for _ in range(cfg.num_hidden_layers):
            for inp, w in zip([x] * 5 + [xi], weights, strict=True):
                y = inp @ w  # forward
                total += jnp.sum(y @ w.T) + jnp.sum(inp.T @ y)  # d input, d weight
            s = jnp.einsum("bqd,bkd->bqk", q, q)  # QKᵀ
            o = jnp.einsum("bqk,bkd->bqd", p, q)  # probs·V
            total += jnp.sum(jnp.einsum("bqk,bkd->bqd", s, q))  # d Q (and d K alike)
            total += jnp.sum(jnp.einsum("bqk,bqd->bkd", s, q))
            total += jnp.sum(jnp.einsum("bqd,bkd->bqk", o, q))  # d probs
            total += jnp.sum(jnp.einsum("bqk,bqd->bkd", p, o))  # d V
            # Data dependencies, so XLA cannot share one layer's products with the next.
            x, xi, q = x + 1e-6 * total, xi + 1e-6 * total, q + 1e-6 * total
        return total

    return jax.jit(step), (x, xi, weights, q, p)


def embedding_update_step(cfg: EncoderConfig, batch: int, length: int) -> tuple[Callable, tuple]:
    """The dense word-embedding SGD update one step makes: gather rows, scatter-add their
    gradient into a table-sized zero buffer, update the whole table (as the PyTorch loop does)."""
    table = jnp.zeros((cfg.vocab_size, cfg.hidden_size), jnp.float32)
    ids = jnp.asarray(np.random.RandomState(0).randint(0, cfg.vocab_size, (batch, length)))

    def step(table, ids):
        g = jax.grad(lambda tb: jnp.sum(jnp.take(tb, ids, axis=0) ** 2))(table)
        return table - 0.01 * g

    return jax.jit(step, donate_argnums=0), (table, ids)


def client_step(cfg: EncoderConfig, w: Workload, *, train: bool = True,
                clients: int = 1) -> tuple[Callable, tuple]:
    """The engine's client update (S local SGD steps in one scan), optionally vmapped."""
    model = Model(cfg)
    params = jax.jit(model.init)(jax.random.key(0))
    loss_fn = classification_loss(model)
    if not train:  # forward only: the loss, no gradient, no update
        data = {k: v[0, 0] for k, v in synthetic_data(w, cfg.vocab_size).items()}
        return jax.jit(lambda p, b: loss_fn(p, b, jax.random.key(0))[0]), (params, data)
    algorithm = fl.fedavg(loss_fn, client_optimizer("sgd"))

    def update(params, data, key):  # one client's round from the server model: its new model
        server = fl.init_state(algorithm, params, jax.random.key(0))
        client = fl.ClientInfo(jnp.int32(0), key, jnp.float32(1.0), None)
        return fl.train_client(algorithm, server, client, data).output.message

    data = synthetic_data(dataclasses.replace(w, clients=clients), cfg.vocab_size)
    if clients == 1:
        fn = jax.jit(update)
        return fn, (params, {k: v[0] for k, v in data.items()}, jax.random.key(0))
    keys = jax.random.split(jax.random.key(0), clients)
    fn = jax.jit(jax.vmap(update, in_axes=(None, 0, 0)))
    return fn, (params, data, keys)


def variants(w: Workload, vmap_clients: int) -> list[Variant]:
    cfg = encoder_config(w)
    steps = w.local_steps
    out = [
        Variant("client step", "the engine's step: dropout, exact GELU, SGD",
                *client_step(cfg, w)),
        Variant("no dropout", "minus the random bits and masks of dropout",
                *client_step(cfg.replace(hidden_dropout_prob=0.0,
                                         attention_probs_dropout_prob=0.0,
                                         classifier_dropout_prob=0.0), w)),
        Variant("tanh GELU", "exact erf GELU → its tanh approximation",
                *client_step(cfg.replace(hidden_act="gelu_new"), w)),
        Variant(f"vmap × {vmap_clients}", f"the step vmapped over {vmap_clients} clients, "
                "per client", *client_step(cfg, w, clients=vmap_clients), clients=vmap_clients),
    ]
    fwd, fwd_args = client_step(cfg, w, train=False)
    mm, mm_args = dense_matmul_step(cfg, w.batch_size, w.max_length)
    emb, emb_args = embedding_update_step(cfg, w.batch_size, w.max_length)
    # One call = one local step for these three; scale them to S steps like the others.
    out += [
        Variant("forward only", "the loss of one batch, no backward or update; × S",
                fwd, fwd_args, clients=1 / steps, useful_flops=1 / 3),
        Variant("dense matmuls only", "the step's matmuls alone at the model's shapes; × S",
                mm, mm_args, clients=1 / steps),
        Variant("embedding update only", "dense word-embedding gradient + SGD update; × S",
                emb, emb_args, clients=1 / steps, useful_flops=0.0, donates=True),
    ]
    return out


def time_variants(vs: list[Variant], reps: int) -> list[dict[str, Any]]:
    """Best-of-`reps` seconds per client of each variant (like the roofline it is compared with:
    the least-disturbed run on a shared machine). Repetitions are interleaved (one call of
    every variant per round-robin pass), so a slow spell hits all variants alike."""
    args = {v.name: v.args for v in vs}
    costs, times = {}, {v.name: [] for v in vs}
    for v in vs:
        cost = v.fn.lower(*v.args).compile().cost_analysis() or {}
        costs[v.name] = cost[0] if isinstance(cost, list) else cost  # older jax: a list
        out = jax.block_until_ready(v.fn(*args[v.name]))  # warm-up
        if v.donates:
            args[v.name] = (out, *args[v.name][1:])
    for _ in range(reps):
        for v in vs:
            t = time.perf_counter()
            out = jax.block_until_ready(v.fn(*args[v.name]))
            times[v.name].append(time.perf_counter() - t)
            if v.donates:
                args[v.name] = (out, *args[v.name][1:])
    rows = []
    for v in vs:
        # XLA costs a scanned program's loop body once: every variant's cost is one local step
        # of one client (vmapped variants are divided by their client count).
        per = max(v.clients, 1)
        rows.append({"variant": v.name, "why": v.why,
                     "seconds": min(times[v.name]) / v.clients,
                     "median_seconds": statistics.median(times[v.name]) / v.clients,
                     "useful_flops": v.useful_flops,
                     "xla_flops": float(costs[v.name].get("flops", 0.0)) / per,
                     "xla_bytes": float(costs[v.name].get("bytes accessed", 0.0)) / per})
    return rows


def profile(w: Workload, reps: int = 5, vmap_clients: int = 8) -> dict[str, Any]:
    cfg = encoder_config(w)
    rows = time_variants(variants(w, vmap_clients), reps)
    model_flops = train_flops_per_token(cfg, w.max_length) * w.batch_size * w.max_length
    roof = matmul_roofline("float32")
    return {"workload": dataclasses.asdict(w), "roofline_flops_per_s": roof,
            "model_flops_per_client_round": model_flops * w.local_steps, "rows": rows,
            "machine": f"{jax.devices()[0].device_kind}, jax {jax.__version__}"}


def report(result: dict[str, Any]) -> str:
    w, rows = result["workload"], result["rows"]
    base = rows[0]["seconds"]
    flops, roof = result["model_flops_per_client_round"], result["roofline_flops_per_s"]
    lines = [
        f"# Client-step profile: {w['model']}, B={w['batch_size']}, L={w['max_length']}, "
        f"S={w['local_steps']} SGD steps",
        "",
        f"- {result['machine']}; float32 matmul roofline (2048² in this process): "
        f"{roof / 1e9:.0f} GFLOP/s",
        f"- model FLOPs per client round (dense + attention matmuls): {flops / 1e9:.2f} GFLOP",
        "- time is per client per round (S local steps), best of the interleaved repetitions; "
        "GFLOP/s = the model FLOPs the variant "
        "does (forward: a third) ÷ that time; XLA columns: one local step of one client, from "
        "XLA's cost analysis",
        "",
        "| variant | ms | × client step | GFLOP/s | of roofline | XLA GFLOP / step | "
        "XLA MB moved / step | what it isolates |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        rate = flops * r["useful_flops"] / r["seconds"]
        gflops, frac = (f"{rate / 1e9:.0f}", f"{rate / roof:.0%}") if rate else ("—", "—")
        lines.append(
            f"| {r['variant']} | {1e3 * r['seconds']:.1f} | {r['seconds'] / base:.2f} | "
            f"{gflops} | {frac} | {r['xla_flops'] / 1e9:.2f} | "
            f"{r['xla_bytes'] / 1e6:.0f} | {r['why']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fedjax_lm.bench.profile",
                                description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mini", choices=("tiny", "mini", "small", "base"))
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--local-steps", type=int, default=4)
    p.add_argument("--vmap-clients", type=int, default=8)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", required=True, help="writes OUT/profile_<model>.json and .md")
    args = p.parse_args(argv)
    w = Workload(model=args.model, batch_size=args.batch_size, max_length=args.max_length,
                 local_steps=args.local_steps)
    result = profile(w, args.reps, args.vmap_clients)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / f"profile_{args.model}.json", json.dumps(result, indent=2) + "\n")
    text = report(result)
    atomic_write_text(out / f"profile_{args.model}.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
