"""Peer: Flower's simulation engine (ray virtual clients, legacy `start_simulation` API).

The strategy is FedAvg with every client sampled each round and evaluation off; a subclass
stamps the start of every round, so round times are what the server sees: dispatching the
weights to ray actors, local training, and aggregation. `--actors` ray actors share the CPUs
(each asks Ray for cores/actors CPUs and runs `--threads` torch threads, default
cores/actors); the model is cached per actor process, as a careful Flower user would, so it
is not rebuilt for every fit call.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from collections import OrderedDict

import _common
import numpy as np
import torch


def _model_and_data(args: argparse.Namespace):
    """This process's model and client batches, built on its first fit. Kept in `_common` (an
    imported module, which Ray's pickler sends by name): a global of this script would be
    pickled by value into every task — the driver's model and every client's data shipped and
    unpickled at each fit call, which was most of Flower's round in the first version."""

    def build():
        _common.setup_torch(args)
        model = _common.build_model(args)
        return model, _common.client_data(args, model.config.vocab_size)

    return _common.per_process("flower_model_and_data", build)


def get_weights(model) -> list[np.ndarray]:
    return [v.detach().cpu().numpy() for v in model.state_dict().values()]


def set_weights(model, weights: list[np.ndarray]) -> None:
    keys = model.state_dict().keys()
    pairs = zip(keys, weights, strict=True)
    model.load_state_dict(OrderedDict((k, torch.from_numpy(w)) for k, w in pairs))


def make_client_fn(args: argparse.Namespace):
    from flwr.client import NumPyClient

    class BertClient(NumPyClient):
        def __init__(self, cid: int) -> None:
            self.cid = cid

        def get_parameters(self, config):
            return get_weights(_model_and_data(args)[0])

        def fit(self, parameters, config):
            model, data = _model_and_data(args)
            set_weights(model, parameters)
            opt = _common.make_optimizer(args, model.parameters())
            for batch in data[self.cid]:
                opt.zero_grad(set_to_none=True)
                model(**batch).loss.backward()
                opt.step()
            n = sum(len(b["labels"]) for b in data[self.cid])
            return get_weights(model), n, {}

    def client_fn(context):
        cid = int(context.node_config["partition-id"])
        return BertClient(cid).to_client()

    return client_fn


def main() -> None:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--actors", type=int, default=1)
    extra, rest = p.parse_known_args()
    args = _common.parse_args(rest)
    cpus = os.cpu_count() or 1
    args.threads = args.threads or max(cpus // extra.actors, 1)
    logging.getLogger("flwr").setLevel(logging.WARNING)

    import flwr as fl
    from flwr.server.strategy import FedAvg

    starts: list[float] = []

    class TimedFedAvg(FedAvg):
        def configure_fit(self, server_round, parameters, client_manager):
            starts.append(time.perf_counter())
            return super().configure_fit(server_round, parameters, client_manager)

        def aggregate_fit(self, server_round, results, failures):
            if failures:
                raise RuntimeError(f"{len(failures)} Flower clients failed: {failures[:1]}")
            out = super().aggregate_fit(server_round, results, failures)
            starts.append(time.perf_counter())  # end of this round
            return out

    _common.setup_torch(args)
    model = _common.build_model(args)  # the initial weights (same seed as every actor's)
    strategy = TimedFedAvg(
        fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=args.clients,
        min_available_clients=args.clients,
        initial_parameters=fl.common.ndarrays_to_parameters(get_weights(model)),
    )
    fl.simulation.start_simulation(
        client_fn=make_client_fn(args),
        num_clients=args.clients,
        config=fl.server.ServerConfig(num_rounds=args.rounds + 1),
        strategy=strategy,
        client_resources={"num_cpus": cpus / extra.actors},
        ray_init_args=_common.init_ray(cpus), keep_initialised=True,
    )
    # starts = [s1, e1, s2, e2, ...]: a round runs from its configure_fit to its aggregation.
    times = [e - s for s, e in zip(starts[0::2], starts[1::2], strict=False)]
    if len(times) != args.rounds + 1:
        raise RuntimeError(f"expected {args.rounds + 1} timed rounds, got {len(times)}")
    _common.emit(_common.summarize("flower", times, args, actors=extra.actors,
                                   flwr_version=fl.__version__, cpus=cpus,
                                   pid=os.getpid()))


if __name__ == "__main__":
    main()
