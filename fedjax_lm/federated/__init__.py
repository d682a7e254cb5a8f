"""The federated engine: a model-agnostic round in which clients are a leading array axis."""

from fedjax_lm.federated.aggregate import Accumulator, normalize_weights
from fedjax_lm.federated.client import LossFn, make_client_update
from fedjax_lm.federated.engine import (
    BACKENDS,
    CLIENT_AXIS,
    EngineConfig,
    FederatedEngine,
    build_engine,
)
from fedjax_lm.federated.placement import DATA_AXIS, make_client_mesh, process_client_ids
from fedjax_lm.federated.sampling import client_key, data_seed, sample_clients, sampling_key
from fedjax_lm.federated.server import (
    SERVER_OPTIMIZERS,
    ServerOptimizer,
    fedadagrad,
    fedadam,
    fedavg,
    fedavgm,
    fedyogi,
    make_server_optimizer,
    scale_by_fedopt,
)
from fedjax_lm.federated.state import ClientResult, RoundMetrics, RoundResult, ServerState

__all__ = [
    "BACKENDS",
    "CLIENT_AXIS",
    "DATA_AXIS",
    "SERVER_OPTIMIZERS",
    "Accumulator",
    "ClientResult",
    "EngineConfig",
    "FederatedEngine",
    "LossFn",
    "RoundMetrics",
    "RoundResult",
    "ServerOptimizer",
    "ServerState",
    "build_engine",
    "client_key",
    "data_seed",
    "fedadagrad",
    "fedadam",
    "fedavg",
    "fedavgm",
    "fedyogi",
    "make_client_mesh",
    "make_client_update",
    "make_server_optimizer",
    "normalize_weights",
    "process_client_ids",
    "sample_clients",
    "sampling_key",
    "scale_by_fedopt",
]
