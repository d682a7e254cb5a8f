"""Peer: a plain PyTorch per-client loop (what a user writes without a simulator).

Each round: every client loads the server weights, runs S local steps, and its weights are
added to an example-weighted sum that becomes the next server model (FedAvg).
"""

from __future__ import annotations

import _common
import torch


def fedavg_round(model, server_state, data, args) -> dict:
    total = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in server_state.items()}
    n_all = 0
    for batches in data:
        model.load_state_dict(server_state)
        opt = _common.make_optimizer(args, model.parameters())
        for batch in batches:
            opt.zero_grad(set_to_none=True)
            model(**batch).loss.backward()
            opt.step()
        n = sum(len(b["labels"]) for b in batches)
        n_all += n
        with torch.no_grad():
            for k, v in model.state_dict().items():
                total[k] += v.float() * n
    return {k: (v / n_all).to(server_state[k].dtype) for k, v in total.items()}


def main() -> None:
    args = _common.parse_args()
    _common.setup_torch(args)
    model = _common.build_model(args)
    data = _common.client_data(args, model.config.vocab_size)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    times = []
    for _ in range(args.rounds + 1):
        with _common.Timer() as t:
            state = fedavg_round(model, state, data, args)
        times.append(t.s)
    _common.emit(_common.summarize("torch-loop", times, args))


if __name__ == "__main__":
    main()
