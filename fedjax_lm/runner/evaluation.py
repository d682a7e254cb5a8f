"""Evaluation at population scale: a seeded sample of clients per eval round, each client
scored on its own data, summarised as accuracy percentiles.

Cross-device populations (10^4-10^6 clients of a few examples each) cannot be evaluated client by
client every round, and their test set is far smaller than the population (SST-2: 872 test
examples for 20,000 clients), so it cannot be split into one shard per client. Instead each eval
round samples K training clients (scored on their local training data: how well the model fits
the clients it trains on) and K held-out clients (`holdout_clients`: partitioned with the
population, never trained on; scored on all their data: how well it serves clients it has
never seen). The sample is a pure function of (seed, round), so a resumed run draws the same.
The global test set is still evaluated whole (`eval_accuracy`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from fedjax_lm.data import ClientIndex, pack_eval

PERCENTILES = (10, 50, 90)
GROUPS = ("train", "heldout")
# what a client's accuracy file records: the last eval round's per-client accuracies
CLIENT_ACCURACY_FILE = "client_accuracy.json"


def eval_sample(num_clients: int, k: int, seed: int, round_number: int) -> np.ndarray:
    """Sorted ids of the K clients (all, if fewer) evaluated in round `round_number`."""
    if k >= num_clients:
        return np.arange(num_clients, dtype=np.int64)
    rng = np.random.default_rng((seed, 2, round_number))
    return np.sort(rng.choice(num_clients, k, replace=False)).astype(np.int64)


def predict_split(predict: Callable, params: Any, features: Mapping[str, np.ndarray],
                  batch_size: int, indices: np.ndarray | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(correct, nll) per example of `features` (rows `indices`, in order), in batches."""
    batches = pack_eval(features, batch_size, indices)
    correct, nll = [], []
    for i in range(batches["mask"].shape[0]):
        c, n = predict(params, {k: v[i] for k, v in batches.items()})
        correct.append(np.asarray(c))
        nll.append(np.asarray(n))
    real = batches["mask"].reshape(-1) > 0
    return np.concatenate(correct)[real], np.concatenate(nll)[real]


def client_accuracies(predict: Callable, params: Any, features: Mapping[str, np.ndarray],
                      index: ClientIndex, ids: np.ndarray, batch_size: int) -> np.ndarray:
    """Each client of `ids`'s accuracy on its own examples of `features`, float64 [len(ids)]."""
    sub = index.select(ids)
    correct, _ = predict_split(predict, params, features, batch_size, sub.order)
    sums = np.add.reduceat(correct.astype(np.float64), sub.offsets[:-1])
    return sums / sub.sizes


def percentile_fields(prefix: str, accuracies: np.ndarray) -> dict[str, float]:
    """`{prefix}_client_accuracy_p10/_p50/_p90/_worst/_mean` (numpy's linear percentiles)."""
    acc = np.asarray(accuracies, dtype=np.float64)
    p = np.percentile(acc, PERCENTILES)
    out = {f"{prefix}_client_accuracy_p{q}": float(v) for q, v in zip(PERCENTILES, p,
                                                                       strict=True)}
    out[f"{prefix}_client_accuracy_worst"] = float(acc.min())
    out[f"{prefix}_client_accuracy_mean"] = float(acc.mean())
    return out


def population_eval(predict: Callable, params: Any, features: Mapping[str, np.ndarray],
                    clients: Mapping[str, ClientIndex | None], k: int, seed: int,
                    round_number: int, batch_size: int
                    ) -> tuple[dict[str, float], dict[str, list[float]]]:
    """(metrics fields, per-client accuracies) of K sampled clients of each group of `clients`
    ({"train": ..., "heldout": ... or None}); group g's sample is drawn from (seed + i, round)."""
    fields: dict[str, float] = {}
    per_client: dict[str, list[float]] = {}
    for i, group in enumerate(GROUPS):
        index = clients.get(group)
        if index is None or not len(index):
            continue
        ids = eval_sample(len(index), k, seed + i, round_number)
        acc = client_accuracies(predict, params, features, index, ids, batch_size)
        fields.update(percentile_fields(group, acc))
        fields[f"{group}_clients_evaluated"] = len(ids)
        per_client[group] = acc.tolist()
    return fields, per_client
