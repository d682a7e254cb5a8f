"""Peer: pfl-research 0.6 on its own framework-comparison workload (CIFAR-10, 1,000 clients of
50 images, 50 a round, batch 10, one local epoch of SGD at 0.1, central SGD at 1.0), as its
`benchmarks/image_classification` baseline configures it, on the federation exported by
`fedjax_lm.bench.pfl_cifar10`.

`FederatedAveraging` over a `FederatedDataset` with pfl's `minimize_reuse` user sampler; a
callback times each central iteration and evaluates the whole test set every `--eval-every`
iterations (outside the timed part). `--workers W` runs W processes under torchrun.
"""

from __future__ import annotations

import os

import _cifar
import _common
import torch


class PflCnn(torch.nn.Module):
    """pfl wants `loss(*user_data)` and `metrics(*user_data)` on the module."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _cifar.simple_cnn()

    def forward(self, x):
        return self.net(x)

    def loss(self, x, y, eval=False):
        self.train(not eval)
        return torch.nn.functional.cross_entropy(self.net(x), y)

    @torch.no_grad()
    def metrics(self, x, y, eval=False):
        from pfl.metrics import Weighted

        return {"loss": Weighted(float(self.loss(x, y, eval=eval)) * len(y), len(y))}


def main() -> None:
    rest = _common.pfl_workers_or_relaunch(__file__)
    args = _cifar.parse_args(rest)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    torch.manual_seed(args.seed)
    from pfl.aggregate.simulate import SimulatedBackend
    from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
    from pfl.callback.base import TrainingProcessCallback
    from pfl.data.dataset import Dataset
    from pfl.data.federated_dataset import FederatedDataset
    from pfl.data.sampling import get_user_sampler
    from pfl.hyperparam import NNEvalHyperParams, NNTrainHyperParams
    from pfl.model.pytorch import PyTorchModel

    fed = _cifar.Federation(args.data)
    module = PflCnn()

    def make_dataset(user_id):
        return Dataset(raw_data=list(fed.client(user_id)), user_id=user_id)

    users = list(range(fed.num_clients))
    data = FederatedDataset(make_dataset, get_user_sampler("minimize_reuse", users))
    model = PyTorchModel(module, local_optimizer_create=torch.optim.SGD,
                         central_optimizer=torch.optim.SGD(module.parameters(), lr=1.0))
    rank = int(os.environ.get("RANK", 0))
    tracker = _cifar.Tracker("pfl", args, fed)
    start = [0.0]

    class Stamp(TrainingProcessCallback):
        def on_train_begin(self, *, model):
            start[0] = _cifar.now()
            return super().on_train_begin(model=model)

        def after_central_iteration(self, aggregate_metrics, model, *, central_iteration):
            seconds = _cifar.now() - start[0]
            if rank == 0:
                tracker.end_round(seconds, module)
            else:
                tracker.round_times.append(seconds)
            start[0] = _cifar.now()  # evaluation is not part of the next round
            return False, type(aggregate_metrics)()

    FederatedAveraging().run(
        algorithm_params=NNAlgorithmParams(
            central_num_iterations=args.rounds, evaluation_frequency=10**9,
            train_cohort_size=args.cohort, val_cohort_size=0),
        backend=SimulatedBackend(training_data=data, val_data=data),
        model=model,
        model_train_params=NNTrainHyperParams(
            local_num_epochs=args.local_epochs, local_learning_rate=args.local_lr,
            local_batch_size=args.batch_size),
        model_eval_params=NNEvalHyperParams(local_batch_size=1000),
        callbacks=[Stamp()],
    )
    if rank == 0:
        import pfl

        workers = int(os.environ.get("WORLD_SIZE", 1))
        tracker.emit(pfl_version=pfl.__version__, workers=workers,
                     setting=f"workers={workers},threads={torch.get_num_threads()}")


if __name__ == "__main__":
    main()
