"""Pack per-example features into the engine's stacked arrays (host side, pure numpy).

The engine vmaps over clients and scans over local steps, so a round's data must be one dict of
arrays shaped [C, S, B, ...] with a float32 `mask` [C, S, B] (1 real, 0 padding). Clients with
fewer steps or a ragged last batch are padded with mask 0; padded slots repeat one of the client's
own examples rather than zeros, so no padded row has an all-zero attention mask (which would make
softmax attention produce NaN that a zero loss weight cannot cancel in the gradient).

Shuffling is per (seed, round, client id): a client's batches do not depend on which other
clients were sampled, and a round is reproducible from (seed, round, client ids).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from fedjax_lm.data.errors import DataError


def _num_steps_one(n: int, batch_size: int, num_epochs: int, drop_last: bool) -> int:
    per_epoch = n // batch_size if drop_last else -(-n // batch_size)
    return num_epochs * per_epoch


def steps_per_client(
    sizes: Sequence[int] | np.ndarray,
    batch_size: int,
    *,
    num_epochs: int | None = None,
    num_steps: int | None = None,
    drop_last: bool = False,
) -> np.ndarray:
    """Local steps of each client: E * ceil(n_c / B) (floor with drop_last), or S for all.

    The max over all clients is a round-independent `pad_steps_to` that keeps shapes (and so the
    compiled step) fixed under partial participation.
    """
    _check_mode(batch_size, num_epochs, num_steps)
    if num_steps is not None:
        return np.full(len(sizes), num_steps, dtype=np.int64)
    assert num_epochs is not None
    return np.asarray(
        [_num_steps_one(int(n), batch_size, num_epochs, drop_last) for n in sizes], dtype=np.int64
    )


def _check_mode(batch_size: int, num_epochs: int | None, num_steps: int | None) -> None:
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    if (num_epochs is None) == (num_steps is None):
        raise DataError("give exactly one of num_epochs (E local epochs) / num_steps (S steps)")
    if num_epochs is not None and num_epochs < 1:
        raise DataError(f"num_epochs must be >= 1, got {num_epochs}")
    if num_steps is not None and num_steps < 1:
        raise DataError(f"num_steps must be >= 1, got {num_steps}")


def _gather(features: Mapping[str, np.ndarray], idx: np.ndarray, mask: np.ndarray) -> dict:
    """features[k][idx] for every key, with the engine's dtypes, plus `mask`."""
    out: dict[str, np.ndarray] = {}
    for key, values in features.items():
        arr = np.asarray(values)[idx]
        if key == "image":
            arr = (
                arr.astype(np.float32) / 255.0 if arr.dtype == np.uint8 else arr.astype(np.float32)
            )
        elif key in ("label", "input_ids", "attention_mask", "token_type_ids"):
            arr = arr.astype(np.int32)
        out[key] = arr
    out["mask"] = mask.astype(np.float32)
    return out


def _client_schedule(
    idx: np.ndarray,
    rng: np.random.Generator,
    batch_size: int,
    num_epochs: int | None,
    num_steps: int | None,
    drop_last: bool,
    shuffle: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """One client's [S_c, B] example indices and 0/1 mask."""
    n = len(idx)
    order = (lambda: rng.permutation(idx)) if shuffle else (lambda: idx)
    if num_steps is not None:
        total = num_steps * batch_size
        reps = -(-total // n)
        flat = np.concatenate([order() for _ in range(reps)])[:total]
        return flat.reshape(num_steps, batch_size), np.ones((num_steps, batch_size), np.float32)
    assert num_epochs is not None
    rows, masks = [], []
    per_epoch = n // batch_size if drop_last else -(-n // batch_size)
    for _ in range(num_epochs):
        perm = order()
        used = per_epoch * batch_size
        take = perm[: min(used, n)]
        pad = used - len(take)
        rows.append(np.concatenate([take, np.full(pad, idx[0], dtype=np.int64)]))
        masks.append(np.concatenate([np.ones(len(take)), np.zeros(pad)]))
    return (
        np.concatenate(rows).reshape(-1, batch_size),
        np.concatenate(masks).reshape(-1, batch_size),
    )


def pack_clients(
    features: Mapping[str, np.ndarray],
    partition: Sequence[np.ndarray],
    *,
    batch_size: int,
    seed: int,
    round_idx: int,
    client_ids: Sequence[int] | np.ndarray | None = None,
    num_epochs: int | None = None,
    num_steps: int | None = None,
    drop_last: bool = False,
    pad_steps_to: int | None = None,
    shuffle: bool = True,
) -> dict[str, np.ndarray]:
    """Stack the round's data for clients `client_ids` (default all) into [C, S, B, ...] arrays.

    Exactly one mode: `num_epochs` E (each client walks its data E times, reshuffled per epoch;
    S = max_c E * ceil(n_c / B), or floor with `drop_last` as in paper 1) or `num_steps` S (each
    client cycles through reshuffled passes for exactly S * B examples, mask all ones).
    `pad_steps_to` fixes S across rounds (see `steps_per_client`).
    """
    _check_mode(batch_size, num_epochs, num_steps)
    if "label" not in features:
        raise DataError(f"features need a 'label' array; got keys {sorted(features)}")
    ids = np.arange(len(partition)) if client_ids is None else np.asarray(client_ids, np.int64)
    if len(ids) == 0:
        raise DataError("no clients to pack")
    if ids.min() < 0 or ids.max() >= len(partition):
        raise DataError(f"client ids must be in [0, {len(partition)}), got {ids.tolist()}")
    schedules = []
    for cid in ids:
        idx = np.asarray(partition[cid], dtype=np.int64)
        if len(idx) == 0:
            raise DataError(f"client {cid} has zero examples")
        if num_epochs is not None and drop_last and len(idx) < batch_size:
            raise DataError(
                f"client {cid} has {len(idx)} examples < batch_size {batch_size}: "
                "with drop_last it would train on nothing"
            )
        rng = np.random.default_rng((seed, round_idx, int(cid)))
        schedules.append(
            _client_schedule(idx, rng, batch_size, num_epochs, num_steps, drop_last, shuffle)
        )
    steps = max(s.shape[0] for s, _ in schedules)
    if pad_steps_to is not None:
        if pad_steps_to < steps:
            raise DataError(f"pad_steps_to={pad_steps_to} < the {steps} steps this round needs")
        steps = pad_steps_to
    idx_all = np.empty((len(ids), steps, batch_size), dtype=np.int64)
    mask_all = np.zeros((len(ids), steps, batch_size), dtype=np.float32)
    for c, (rows, mask) in enumerate(schedules):
        idx_all[c] = rows[0, 0]  # padding steps repeat a real example of this client (mask 0)
        idx_all[c, : len(rows)] = rows
        mask_all[c, : len(rows)] = mask
    return _gather(features, idx_all, mask_all)


def pack_eval(
    features: Mapping[str, np.ndarray],
    batch_size: int,
    indices: Sequence[int] | np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """A whole split (or `indices` of it), in order, as [n_batches, B, ...] with mask."""
    n_total = len(features["label"])
    idx = np.arange(n_total) if indices is None else np.asarray(indices, dtype=np.int64)
    if len(idx) == 0:
        raise DataError("nothing to evaluate: zero examples")
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    n_batches = -(-len(idx) // batch_size)
    pad = n_batches * batch_size - len(idx)
    flat = np.concatenate([idx, np.full(pad, idx[0], dtype=np.int64)])
    mask = np.concatenate([np.ones(len(idx)), np.zeros(pad)])
    return _gather(
        features, flat.reshape(n_batches, batch_size), mask.reshape(n_batches, batch_size)
    )


def pack_clients_eval(
    features: Mapping[str, np.ndarray],
    partition: Sequence[np.ndarray],
    batch_size: int,
    client_ids: Sequence[int] | np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Each client's examples once, in order, as [C, n_batches, B, ...] (per-client local test)."""
    return pack_clients(
        features,
        partition,
        batch_size=batch_size,
        seed=0,
        round_idx=0,
        client_ids=client_ids,
        num_epochs=1,
        shuffle=False,
    )
