"""Peer: pfl-research (Apple's `pfl`) simulation with its PyTorch backend.

`FederatedAveraging` over a `FederatedDataset` of C users, every user in every cohort
(`train_cohort_size = C`), S local steps (one epoch of S·B examples at batch B), central SGD
with learning rate 1 (the FedAvg mean). A callback stamps each central iteration.

`--workers W` (W > 1) runs W pfl worker processes under `torchrun` (pfl's own multi-process
simulation over `torch.distributed`, gloo on a CPU): each trains its share of the cohort and the
updates are all-reduced. Only rank 0 prints the result line.
"""

from __future__ import annotations

import time

import _common
import torch


class PflBert(torch.nn.Module):
    """pfl wants `loss(*user_data)` and `metrics(*user_data)` on the module."""

    def __init__(self, bert) -> None:
        super().__init__()
        self.bert = bert

    train_steps = 0  # counts training forward passes: proves pfl ran the local steps

    def loss(self, input_ids, attention_mask, token_type_ids, labels, eval=False):
        self.train(not eval)
        if not eval and torch.is_grad_enabled():
            PflBert.train_steps += 1
        return self.bert(input_ids=input_ids, attention_mask=attention_mask,
                         token_type_ids=token_type_ids, labels=labels).loss

    @torch.no_grad()
    def metrics(self, input_ids, attention_mask, token_type_ids, labels, eval=False):
        from pfl.metrics import Weighted

        loss = self.loss(input_ids, attention_mask, token_type_ids, labels, eval=eval)
        return {"loss": Weighted(float(loss) * len(labels), len(labels))}


def main() -> None:
    rest = _common.pfl_workers_or_relaunch(__file__)
    args = _common.parse_args(rest)
    _common.setup_torch(args)
    from pfl.aggregate.simulate import SimulatedBackend
    from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
    from pfl.callback.base import TrainingProcessCallback
    from pfl.data.dataset import Dataset
    from pfl.data.federated_dataset import FederatedDataset
    from pfl.data.sampling import get_user_sampler
    from pfl.hyperparam import NNEvalHyperParams, NNTrainHyperParams
    from pfl.model.pytorch import PyTorchModel

    bert = _common.build_model(args)
    data = _common.client_data(args, bert.config.vocab_size)
    keys = ("input_ids", "attention_mask", "token_type_ids", "labels")
    users = {
        c: [torch.cat([b[k] for b in data[c]]) for k in keys] for c in range(args.clients)
    }

    def make_dataset(user_id):
        return Dataset(raw_data=users[user_id], user_id=user_id)

    fed = FederatedDataset(make_dataset, get_user_sampler("minimize_reuse", list(users)))
    model = PyTorchModel(
        PflBert(bert),
        local_optimizer_create=(torch.optim.SGD if args.optimizer == "sgd" else torch.optim.Adam),
        central_optimizer=torch.optim.SGD(bert.parameters(), lr=1.0),
    )
    stamps = [0.0]

    class Stamp(TrainingProcessCallback):
        def on_train_begin(self, *, model):
            stamps[0] = time.perf_counter()
            return super().on_train_begin(model=model)

        def after_central_iteration(self, aggregate_metrics, model, *, central_iteration):
            stamps.append(time.perf_counter())
            return False, type(aggregate_metrics)()

    FederatedAveraging().run(
        algorithm_params=NNAlgorithmParams(
            central_num_iterations=args.rounds + 1, evaluation_frequency=10**6,
            train_cohort_size=args.clients, val_cohort_size=0),
        backend=SimulatedBackend(training_data=fed, val_data=fed),
        model=model,
        model_train_params=NNTrainHyperParams(
            local_num_epochs=1, local_learning_rate=args.lr or (0.01 if args.optimizer == "sgd"
                                                                else 1e-4),
            local_batch_size=args.batch_size),
        model_eval_params=NNEvalHyperParams(local_batch_size=args.batch_size),
        callbacks=[Stamp()],
    )
    times = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    import pfl

    steps, workers, rank = PflBert.train_steps, 1, 0
    if torch.distributed.is_initialized():  # the local steps of every worker
        count = torch.tensor([steps], dtype=torch.float64)
        torch.distributed.all_reduce(count)
        steps, workers = float(count[0]), torch.distributed.get_world_size()
        rank = torch.distributed.get_rank()
    if rank == 0:
        _common.emit(_common.summarize(
            "pfl", times, args, pfl_version=pfl.__version__, workers=workers,
            local_steps_per_round=steps / (args.rounds + 1) / args.clients))


if __name__ == "__main__":
    main()
