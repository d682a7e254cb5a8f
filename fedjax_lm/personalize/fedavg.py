"""FedAvg for the global expert, through the engine, with opt-out clients and early stopping.

Only the global model's params are ever handed to the engine (`engine.init(global_params)`), so
the aggregated pytree cannot contain a gate or a local expert. Opt-out clients are removed from
the population the cohorts are sampled from: their data is never packed into a round, so their
updates cannot reach the average (they still build a mixture from the resulting global model).
Early stopping keeps the global params with the lowest mean validation loss over the
participating clients.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np
import optax

from fedjax_lm import federated as fl
from fedjax_lm.data import pack_clients, steps_per_client
from fedjax_lm.grid import ConfigError

Params = Any


@dataclass(frozen=True)
class FedAvgConfig:
    """Paper 2: 5 sampled clients per round, local Adam, batch 10, 3 local epochs."""

    rounds: int = 100
    cohort_size: int = 5
    local_epochs: int = 3
    batch_size: int = 10
    lr: float = 5e-5
    eval_every: int = 5  # rounds between validation checks
    patience: int = 5  # validation checks without improvement before stopping
    backend: str = "vmap"


@dataclass(frozen=True)
class FedAvgResult:
    params: Params  # the best-validation global model
    best_round: int
    rounds_run: int
    history: list[dict[str, float]] = field(default_factory=list)


def opt_out_clients(num_clients: int, fraction: float, seed: int) -> np.ndarray:
    """A seeded random set of round(fraction·N) client ids that never join FedAvg."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"opt-out fraction must be in [0, 1), got {fraction}")
    n = int(round(fraction * num_clients))
    return np.sort(np.random.default_rng((seed, 7)).choice(num_clients, n, replace=False))


def participants(num_clients: int, opted_out: Sequence[int]) -> np.ndarray:
    """The client ids FedAvg may sample: everyone who did not opt out."""
    return np.setdiff1d(np.arange(num_clients), np.asarray(opted_out, dtype=np.int64))


def make_fedavg_engine(loss_fn: Callable, cfg: FedAvgConfig) -> fl.FederatedEngine:
    """Plain FedAvg (example-weighted mean, no server optimizer) with local Adam."""
    return fl.build_engine(loss_fn, optax.adam(cfg.lr), None, backend=cfg.backend)


def run_fedavg(
    engine: fl.FederatedEngine,
    init_params: Params,
    features: Mapping[str, np.ndarray],
    train_partition: Sequence[np.ndarray],
    pool: np.ndarray,
    cfg: FedAvgConfig,
    seed: int,
    val_loss: Callable[[Params], float] | None = None,
    log: Callable[[str], None] | None = None,
) -> FedAvgResult:
    """FedAvg over the clients in `pool` (ids into `train_partition`).

    `engine` comes from `make_fedavg_engine` (built once, reused across runs). Each round
    samples `cohort_size` clients of `pool` (`sample_clients`), packs their
    `local_epochs` of data and runs one engine round (example-weighted mean, plain FedAvg
    server). Every `eval_every` rounds `val_loss(global_params)` is checked; the best params are
    kept (never the initial params) and training stops after `patience` checks without
    improvement.
    """
    pool = np.asarray(pool, dtype=np.int64)
    cohort = cfg.cohort_size
    if not 1 <= cohort <= len(pool):  # never clamped: the run would not be the one configured
        raise ConfigError(f"fedavg.cohort_size must be in [1, {len(pool)}] (the clients that "
                          f"take part), got {cohort}: a cohort cannot be larger than the "
                          "population; lower fedavg.cohort_size or raise num_clients")
    key = jax.random.key(seed)
    state = engine.init(init_params, key)
    sizes = [len(train_partition[c]) for c in pool]
    steps = int(steps_per_client(sizes, cfg.batch_size, num_epochs=cfg.local_epochs).max())
    best = jax.tree.map(lambda x: x.copy(), state.params)
    # The initial model is never a candidate (best_loss starts at inf): under strong skew one
    # round can raise the mean validation loss of the unsampled clients, and keeping the
    # random init would make "FedAvg" and "fine-tuned" meaningless. Its loss is logged only.
    best_loss, best_round, bad, history = np.inf, 0, 0, []
    if val_loss is not None:
        history.append({"round": 0, "train_loss": None,
                        "val_loss": val_loss(state.params)})
    rounds_run = 0
    for r in range(cfg.rounds):
        ids = pool[fl.sample_clients(fl.sampling_key(key, r), len(pool), cohort)]
        data = pack_clients(
            features, train_partition, batch_size=cfg.batch_size, seed=seed, round_idx=r,
            client_ids=ids, num_epochs=cfg.local_epochs, pad_steps_to=steps,
        )
        state, metrics, _ = engine.run_round(state, data, client_ids=ids)
        rounds_run = r + 1
        if val_loss is None or rounds_run % cfg.eval_every and rounds_run != cfg.rounds:
            continue
        loss = val_loss(state.params)
        history.append({"round": rounds_run, "train_loss": float(metrics.loss), "val_loss": loss})
        if log:
            log(f"  fedavg round {rounds_run}: train {float(metrics.loss):.3f} val {loss:.3f}")
        if loss < best_loss:
            best = jax.tree.map(lambda x: x.copy(), state.params)
            best_loss, best_round, bad = loss, rounds_run, 0
        else:
            bad += 1
            if bad >= cfg.patience:
                break
    if val_loss is None:
        best, best_round = state.params, rounds_run
    return FedAvgResult(best, best_round, rounds_run, history)
