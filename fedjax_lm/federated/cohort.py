"""Building a round's `Cohort` on the host: validate the data, name the clients, weigh them."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lm.federated.state import Cohort, PyTree

WEIGHTINGS = ("examples", "uniform")


def check_data(data: dict[str, Any]):
    """Validate `[C, S, B, ...]` client data; return its mask."""
    if "mask" not in data:
        raise ValueError("client data needs an example mask data['mask'] of shape [C, S, B]")
    mask = data["mask"]
    if mask.ndim != 3:
        raise ValueError(f"data['mask'] must be [C, S, B], got shape {tuple(mask.shape)}")
    for path, leaf in jax.tree_util.tree_leaves_with_path(data):
        if tuple(leaf.shape[:3]) != tuple(mask.shape):
            raise ValueError(
                f"data leaf {jax.tree_util.keystr(path)} has shape {tuple(leaf.shape)}; "
                f"every leaf must start with [C, S, B] = {tuple(mask.shape)}"
            )
    return mask


def client_weights(mask: Any, weighting: str = "examples"):
    """A client's weight: its real examples, or 1 for every client with data (`uniform`)."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; choose one of {WEIGHTINGS}")
    xp = np if isinstance(mask, np.ndarray) else jnp
    examples = xp.sum(mask.reshape(mask.shape[0], -1).astype(xp.float32), axis=1)
    if weighting == "uniform":
        return (examples > 0).astype(xp.float32)
    return examples


def cohort_ids(client_ids: Any, num_clients: int) -> np.ndarray:
    """Population ids as int32 `[C]`; default `0..C-1`."""
    ids = np.arange(num_clients) if client_ids is None else np.asarray(client_ids)
    if ids.shape != (num_clients,):
        raise ValueError(f"client_ids must have shape ({num_clients},), got {ids.shape}")
    return ids.astype(np.int32)


def make_cohort(
    data: dict[str, Any],
    client_ids: Any = None,
    weights: Any = None,
    *,
    weighting: str = "examples",
    client_states: PyTree | None = None,
) -> Cohort:
    """A validated cohort. `client_ids` default to `0..C-1`; `weights` override `weighting`."""
    mask = check_data(data)
    num_clients = mask.shape[0]
    ids = cohort_ids(client_ids, num_clients)
    w = client_weights(mask, weighting) if weights is None else weights
    w = w.astype(np.float32) if isinstance(w, np.ndarray) else jnp.asarray(w, jnp.float32)
    if w.shape != (num_clients,):
        raise ValueError(f"weights must have shape ({num_clients},), got {tuple(w.shape)}")
    return Cohort(data=data, client_ids=ids, weights=w,
                  client_states=client_states)
