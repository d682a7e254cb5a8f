"""Peer: Flower 1.42's simulation engine on pfl-research's framework-comparison workload
(CIFAR-10, 1,000 clients of 50 images, 50 a round, batch 10, one local epoch of SGD at 0.1,
FedAvg), set up as `publications/pfl/flower/cifar10` of apple/pfl-research does (FedAvg with
`fraction_fit` = 50 / 1,000, centralized evaluation on the server), on the federation exported
by `fedjax_lm.bench.pfl_cifar10`.

A round is timed from its `configure_fit` to its aggregation; the centralized evaluation runs
after that, outside the timed part. `--actors` Ray actors share the cores (each asks Ray for
cores/actors CPUs and runs `--threads` torch threads, default cores/actors); each actor loads
the data and builds the model once.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections import OrderedDict

import _cifar
import _common
import numpy as np
import torch


def _worker(args: argparse.Namespace):
    """This actor's federation and model, built on its first fit and kept in `_common` (an
    imported module, sent by name): a dict of this script would be pickled by value into every
    task and start empty in each, so every fit reloaded CIFAR-10 (flower_sim.py says more)."""

    def build():
        torch.set_num_threads(args.threads)
        return _cifar.Federation(args.data), _cifar.simple_cnn()

    return _common.per_process("flower_cifar_worker", build)


def get_weights(model) -> list[np.ndarray]:
    return [v.detach().cpu().numpy() for v in model.state_dict().values()]


def set_weights(model, weights: list[np.ndarray]) -> None:
    pairs = zip(model.state_dict().keys(), weights, strict=True)
    model.load_state_dict(OrderedDict((k, torch.from_numpy(np.copy(w))) for k, w in pairs))


def make_client_fn(args: argparse.Namespace):
    from flwr.client import NumPyClient

    class CifarClient(NumPyClient):
        def __init__(self, cid: int) -> None:
            self.cid = cid

        def fit(self, parameters, config):
            fed, model = _worker(args)
            set_weights(model, parameters)
            x, y = fed.client(self.cid)
            gen = torch.Generator().manual_seed(args.seed * 1_000_003 + int(config["round"])
                                                * 1009 + self.cid)
            _cifar.train_local(model, x, y, args, gen)
            return get_weights(model), len(y), {}

    def client_fn(context):
        return CifarClient(int(context.node_config["partition-id"])).to_client()

    return client_fn


def main() -> None:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--actors", type=int, default=1)
    extra, rest = p.parse_known_args()
    args = _cifar.parse_args(rest)
    cpus = os.cpu_count() or 1
    args.threads = args.threads or max(cpus // extra.actors, 1)
    torch.manual_seed(args.seed)
    logging.getLogger("flwr").setLevel(logging.WARNING)

    import flwr as fl
    from flwr.server.strategy import FedAvg

    fed = _cifar.Federation(args.data)
    model = _cifar.simple_cnn()
    tracker = _cifar.Tracker("flower", args, fed)
    start = [0.0]

    class TimedFedAvg(FedAvg):
        def configure_fit(self, server_round, parameters, client_manager):
            start[0] = _cifar.now()
            return super().configure_fit(server_round, parameters, client_manager)

        def aggregate_fit(self, server_round, results, failures):
            if failures:
                raise RuntimeError(f"{len(failures)} Flower clients failed: {failures[:1]}")
            out = super().aggregate_fit(server_round, results, failures)
            seconds = _cifar.now() - start[0]
            set_weights(model, fl.common.parameters_to_ndarrays(out[0]))
            tracker.end_round(seconds, model)  # evaluates on schedule, after the timing
            return out

    n = fed.num_clients
    strategy = TimedFedAvg(
        fraction_fit=args.cohort / n, fraction_evaluate=0.0, min_fit_clients=args.cohort,
        min_evaluate_clients=0, min_available_clients=n, accept_failures=False,
        on_fit_config_fn=lambda r: {"round": r},
        initial_parameters=fl.common.ndarrays_to_parameters(get_weights(model)),
    )
    torch.set_num_threads(args.threads)
    fl.simulation.start_simulation(
        client_fn=make_client_fn(args), num_clients=n,
        config=fl.server.ServerConfig(num_rounds=args.rounds), strategy=strategy,
        client_resources={"num_cpus": cpus / extra.actors},
        ray_init_args=_common.init_ray(cpus), keep_initialised=True,
    )
    if len(tracker.round_times) != args.rounds:
        raise RuntimeError(f"expected {args.rounds} rounds, got {len(tracker.round_times)}")
    tracker.emit(flwr_version=fl.__version__, actors=extra.actors,
                 setting=f"actors={extra.actors},threads={args.threads}")


if __name__ == "__main__":
    main()
