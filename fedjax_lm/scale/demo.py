"""A multi-host-ready federated run in one file: the same command on 1 CPU, 8 GPUs or a pod.

    python -m fedjax_lm.scale.demo --clients 16 --rounds 5 [--data-parallel 2]

Every process joins the distributed runtime when the environment asks for it, builds the mesh
over all devices of all processes, generates only its own clients' data (softmax regression,
a stand-in for a real loader) and trains through `run_round_local`; process 0 prints.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_lm import federated as fl
from fedjax_lm.scale.distributed import is_primary, maybe_initialize_distributed

DIM, CLASSES = 16, 4


def loss_fn(params, batch, rng):
    logits = batch["x"] @ params["w"] + params["b"]
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
    return jnp.sum(losses * batch["mask"]) / jnp.maximum(batch["mask"].sum(), 1.0), {}


def load_client(client_id: int, steps: int, batch: int) -> dict[str, np.ndarray]:
    """One client's `[S, B, ...]` data, a pure function of its id (any process can load it)."""
    rs = np.random.RandomState(client_id)
    x = rs.randn(steps, batch, DIM).astype(np.float32)
    w = np.random.RandomState(10_000).randn(DIM, CLASSES) + 0.5 * rs.randn(DIM, CLASSES)
    return {"x": x, "y": (x @ w).argmax(-1).astype(np.int32),
            "mask": np.ones((steps, batch), np.float32)}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fedjax_lm.scale.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--population", type=int, default=64)
    p.add_argument("--clients", type=int, default=16, help="clients per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--clients-per-chunk", type=int, default=None)
    p.add_argument("--data-parallel", type=int, default=1)
    args = p.parse_args(argv)

    maybe_initialize_distributed()  # before anything touches a device
    engine = fl.build_engine(loss_fn, optax.sgd(0.5), fl.fedadam(0.05), backend="mesh",
                             clients_per_chunk=args.clients_per_chunk,
                             data_parallel=args.data_parallel)
    params = {"w": jnp.zeros((DIM, CLASSES)), "b": jnp.zeros((CLASSES,))}
    state = engine.init(params, jax.random.key(0))
    if is_primary():
        print(f"{jax.process_count()} process(es), {jax.device_count()} devices, mesh "
              f"{dict(engine.mesh.shape)}", flush=True)
    positions = engine.process_client_ids(args.clients)
    for r in range(args.rounds):
        ids = fl.sample_clients(fl.sampling_key(state.rng, r), args.population, args.clients)
        mine = [load_client(int(c), args.steps, args.batch_size)
                for c in ids[positions[positions < args.clients]]]
        empty = jax.tree.map(np.zeros_like, load_client(0, args.steps, args.batch_size))
        mine += [empty] * (len(positions) - len(mine))  # padding clients come last
        local = jax.tree.map(lambda *xs: np.stack(xs), *mine)
        out = engine.run_round_local(state, local, num_clients=args.clients, client_ids=ids)
        state = out.state
        if is_primary():
            print(f"round {r}: loss {float(out.metrics.loss):.4f}", flush=True)
    if is_primary():
        checksum = float(sum(jnp.sum(jnp.abs(x)) for x in jax.tree.leaves(state.params)))
        print(f"done: |params|_1 = {checksum:.6f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
