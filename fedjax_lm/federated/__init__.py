"""The federated engine: a model-agnostic round in which clients are a leading array axis.

An `Algorithm` is a few pure hooks over one client (`algorithm`); `make_round(algorithm,
executor)` builds the round program on an executor (`executors`); `FederatedEngine` is the
thin host driver around it (`engine`).
"""

from fedjax_lm.federated.aggregate import (
    Aggregate,
    Aggregator,
    Context,
    coordinate_median,
    fixed_mean,
    normalize_weights,
    weighted_mean,
)
from fedjax_lm.federated.algorithm import (
    Algorithm,
    LossFn,
    TrainedClient,
    init_state,
    train_client,
)
from fedjax_lm.federated.attacks import (
    ATTACKS,
    AttackConfig,
    attacked,
    flip_labels,
    malicious_clients,
)
from fedjax_lm.federated.client_optimizers import CLIENT_OPTIMIZERS, make_client_optimizer
from fedjax_lm.federated.cohort import WEIGHTINGS, client_weights, make_cohort
from fedjax_lm.federated.engine import EngineConfig, FederatedEngine, build_engine
from fedjax_lm.federated.executors import (
    BACKENDS,
    CHUNK_EXECUTORS,
    ExecutorConfig,
    RoundProgram,
    UnsupportedError,
    make_round,
)
from fedjax_lm.federated.fedavg import fedavg
from fedjax_lm.federated.lowrank import factor_product_mean
from fedjax_lm.federated.placement import (
    CLIENT_AXIS,
    DATA_AXIS,
    make_client_mesh,
    process_client_ids,
)
from fedjax_lm.federated.privacy import DPConfig, DPServerState, clip_update, dp_fedavg
from fedjax_lm.federated.robust import (
    AGGREGATORS,
    ALIASES,
    WHOLE_COHORT,
    RobustConfig,
    geometric_median,
    krum,
    make_aggregator,
    multi_krum,
    norm_bound,
    trimmed_mean,
)
from fedjax_lm.federated.sampling import (
    client_key,
    noise_key,
    pad_cohort,
    poisson_clients,
    sample_clients,
    sampling_key,
)
from fedjax_lm.federated.scaffold import scaffold
from fedjax_lm.federated.server import (
    SERVER_OPTIMIZERS,
    ServerOptimizer,
    averaging,
    fedadagrad,
    fedadam,
    fedavgm,
    fedyogi,
    make_server_optimizer,
    scale_by_fedopt,
)
from fedjax_lm.federated.state import (
    ClientInfo,
    ClientMetrics,
    ClientOutput,
    Cohort,
    RoundMetrics,
    RoundOutputs,
    RoundResult,
    ServerState,
)
from fedjax_lm.federated.store import ClientStateStore
from fedjax_lm.federated.trainable import Trainable, mask_from_predicate

ALGORITHMS = ("fedavg", "fedprox", "scaffold")

__all__ = [
    "AGGREGATORS", "ALGORITHMS", "ALIASES", "ATTACKS", "BACKENDS", "WHOLE_COHORT",
    "AttackConfig", "Context", "RobustConfig", "attacked", "flip_labels", "geometric_median",
    "krum", "make_aggregator", "malicious_clients", "multi_krum", "norm_bound",
    "trimmed_mean",
    "CLIENT_OPTIMIZERS", "CHUNK_EXECUTORS", "CLIENT_AXIS", "DATA_AXIS",
    "SERVER_OPTIMIZERS", "WEIGHTINGS", "Aggregate", "Aggregator", "Algorithm", "ClientInfo",
    "ClientMetrics", "ClientOutput", "ClientStateStore", "Cohort", "DPConfig", "DPServerState",
    "EngineConfig",
    "ExecutorConfig", "FederatedEngine", "LossFn", "RoundMetrics", "RoundOutputs",
    "RoundProgram", "RoundResult", "ServerOptimizer", "ServerState", "TrainedClient",
    "UnsupportedError", "averaging", "build_engine", "client_key", "client_weights",
    "coordinate_median", "factor_product_mean", "mask_from_predicate", "Trainable",
    "clip_update", "coordinate_median", "dp_fedavg", "fixed_mean", "noise_key", "pad_cohort",
    "poisson_clients",
    "fedadagrad", "fedadam", "fedavg", "fedavgm", "fedyogi", "init_state",
    "make_client_mesh", "make_client_optimizer", "make_cohort",
    "make_round", "make_server_optimizer", "normalize_weights", "process_client_ids",
    "sample_clients", "sampling_key", "scaffold", "scale_by_fedopt", "train_client",
    "weighted_mean",
]
