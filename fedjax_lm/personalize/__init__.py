"""Personalisation (paper 2's mixture of experts) and the ABU experiments (paper 3).

Pure functions over params pytrees: per-client models carry a leading client axis and train
vmapped together; only the global (FedAvg) model ever goes through the federated engine.
"""

from fedjax_lm.personalize.clients import (
    FitConfig,
    FitResult,
    broadcast_clients,
    fit_clients,
    make_epoch_fn,
    make_eval_fn,
    select_clients,
)
from fedjax_lm.personalize.fedavg import (
    FedAvgConfig,
    FedAvgResult,
    opt_out_clients,
    participants,
    run_fedavg,
)
from fedjax_lm.personalize.mixture import (
    Classifier,
    engine_loss,
    mix_log_probs,
    mixture_eval,
    mixture_log_probs,
    mixture_loss,
    single_eval,
    single_loss,
)

__all__ = [
    "Classifier",
    "FedAvgConfig",
    "FedAvgResult",
    "FitConfig",
    "FitResult",
    "broadcast_clients",
    "engine_loss",
    "fit_clients",
    "make_epoch_fn",
    "make_eval_fn",
    "mix_log_probs",
    "mixture_eval",
    "mixture_log_probs",
    "mixture_loss",
    "opt_out_clients",
    "participants",
    "run_fedavg",
    "select_clients",
    "single_eval",
    "single_loss",
]
