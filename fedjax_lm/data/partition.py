"""Client partitioners: pure, seeded functions (labels, num_clients, seed) -> a `ClientIndex`.

Each returns one sorted int64 index array per client; no index appears twice and no client is
empty (checked on every call). Packing shuffles within a client, so the order here is canonical.
The result is held as two flat arrays (`ClientIndex`: the example indices ordered by client, and
per-client offsets), built by a stable argsort of each example's assigned client: a population of
10^6 clients costs two int64 arrays, not 10^6 Python lists. Client c's examples are a view.
The label-skew schemes follow the papers: `iid` / `label_sorted` (Hilmkil et al.), `majority`
(Listo Zec et al.), `dirichlet` and `quantity_skew` (FedNLP); `natural` uses a group column.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from fedjax_lm.data.errors import DataError

Partition = list[np.ndarray]


@dataclass(frozen=True, eq=False)
class ClientIndex(Sequence[np.ndarray]):
    """Clients' example indices as flat arrays: client c holds `order[offsets[c]:offsets[c+1]]`
    (sorted). A `Sequence` of index arrays, so code written for lists of arrays reads it as is."""

    order: np.ndarray  # int64 [M]: example indices grouped by client, ascending within one
    offsets: np.ndarray  # int64 [K + 1]: client c's slice of `order`

    @classmethod
    def from_assignment(cls, client_of: np.ndarray, num_clients: int) -> ClientIndex:
        """From each example's client id (-1: in no client): a stable argsort groups them."""
        client_of = np.asarray(client_of, dtype=np.int64)
        kept = np.flatnonzero(client_of >= 0)
        order = kept[np.argsort(client_of[kept], kind="stable")]
        counts = np.bincount(client_of[kept], minlength=num_clients)
        return cls(order, np.concatenate([[0], np.cumsum(counts)]).astype(np.int64))

    @classmethod
    def from_arrays(cls, partition: Sequence[np.ndarray]) -> ClientIndex:
        """From one index array per client (each sorted here)."""
        parts = [np.sort(np.asarray(p, dtype=np.int64)) for p in partition]
        sizes = np.asarray([len(p) for p in parts], dtype=np.int64)
        order = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        return cls(order, np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64))

    @property
    def sizes(self) -> np.ndarray:
        """Examples per client, int64 [K]."""
        return np.diff(self.offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, c):  # type: ignore[override]
        if isinstance(c, slice):
            return [self[i] for i in range(*c.indices(len(self)))]
        c = int(c)
        if c < 0:
            c += len(self)
        if not 0 <= c < len(self):
            raise IndexError(f"client {c} out of range [0, {len(self)})")
        return self.order[self.offsets[c] : self.offsets[c + 1]]

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self[c] for c in range(len(self)))

    def select(self, client_ids: np.ndarray) -> ClientIndex:
        """The clients `client_ids`, in that order, as a new index (e.g. the training clients)."""
        ids = np.asarray(client_ids, dtype=np.int64)
        sizes = self.sizes[ids]
        starts = np.repeat(self.offsets[ids], sizes)
        within = np.arange(int(sizes.sum())) - np.repeat(np.cumsum(sizes) - sizes, sizes)
        order = self.order[starts + within]
        return ClientIndex(order, np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64))


Partitioner = Callable[[np.ndarray, int | None, int], ClientIndex]


def _rng(seed: int | np.random.Generator) -> np.random.Generator:
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def _check_counts(labels: np.ndarray, num_clients: int | None) -> tuple[np.ndarray, int]:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise DataError(f"labels must be 1-D, got shape {labels.shape}")
    if num_clients is None or int(num_clients) < 1:
        raise DataError(f"num_clients must be >= 1, got {num_clients}")
    if len(labels) < num_clients:
        raise DataError(f"fewer examples ({len(labels)}) than clients ({num_clients}); use fewer "
                        "clients or more examples")
    return labels, int(num_clients)


def validate_partition(partition: Sequence[np.ndarray], num_examples: int) -> ClientIndex:
    """A `ClientIndex` (sorted per client); DataError if a client is empty, an index repeats or
    is out of range. Vectorised: O(examples) whatever the number of clients."""
    index = (partition if isinstance(partition, ClientIndex)
             else ClientIndex.from_arrays(partition))
    empty = np.flatnonzero(index.sizes == 0)
    if len(empty):
        raise DataError(f"client {int(empty[0])} was left with zero examples")
    flat = index.order
    if len(flat) and (flat.min() < 0 or flat.max() >= num_examples):
        raise DataError(f"partition indices outside [0, {num_examples})")
    if np.bincount(flat, minlength=num_examples).max(initial=0) > 1:
        raise DataError("partition puts an example in two clients")
    return index


def iid(labels: np.ndarray, num_clients: int, seed: int | np.random.Generator = 0) -> ClientIndex:
    """Seeded random equal shards of len // num_clients; the remainder is dropped (paper 1)."""
    labels, n_c = _check_counts(labels, num_clients)
    perm = _rng(seed).permutation(len(labels))
    return validate_partition(_chunks(perm, len(labels) // n_c, n_c), len(labels))


def label_sorted(
    labels: np.ndarray, num_clients: int, seed: int | np.random.Generator = 0
) -> ClientIndex:
    """Stable sort by label, then contiguous equal chunks (paper 1's non-IID option).

    Deterministic without the seed; it is accepted for a uniform signature.
    """
    labels, n_c = _check_counts(labels, num_clients)
    order = np.argsort(labels, kind="stable")
    return validate_partition(_chunks(order, len(labels) // n_c, n_c), len(labels))


def _chunks(order: np.ndarray, size: int, num_clients: int) -> ClientIndex:
    """Client c: `order[c * size:(c + 1) * size]`, sorted; the rest of `order` in no client."""
    body = np.sort(order[: size * num_clients].reshape(num_clients, size), axis=1)
    return ClientIndex(body.reshape(-1).astype(np.int64),
                       np.arange(num_clients + 1, dtype=np.int64) * size)


def _draw_from_pools(
    pools: list[np.ndarray], counts: np.ndarray, num_examples: int, labels_desc: str = "class"
) -> ClientIndex:
    """Take counts[c, k] examples of class k for client c from the shuffled per-class pools
    (clients in turn take the next slice of each pool), vectorised over clients."""
    n_c = counts.shape[0]
    need = np.cumsum(counts, axis=0)  # [C, K]: what clients 0..c take of each pool
    have = np.asarray([len(p) for p in pools], dtype=np.int64)
    short = need > have
    if short.any():
        c = int(np.flatnonzero(short.any(axis=1))[0])  # the first client that runs out
        k = int(np.flatnonzero(short[c])[0])
        raise DataError(
            f"not enough examples of {labels_desc} {k}: need {int(need[c, k])}, "
            f"have {len(pools[k])}; use fewer clients or smaller clients"
        )
    client_of = np.full(num_examples, -1, dtype=np.int64)
    for k, pool in enumerate(pools):
        taken = int(need[-1, k]) if n_c else 0
        client_of[pool[:taken]] = np.repeat(np.arange(n_c), counts[:, k])
    return ClientIndex.from_assignment(client_of, n_c)


def _class_pools(
    labels: np.ndarray, num_classes: int, rng: np.random.Generator
) -> list[np.ndarray]:
    return [rng.permutation(np.flatnonzero(labels == k)) for k in range(num_classes)]


def dirichlet(
    labels: np.ndarray,
    num_clients: int,
    seed: int | np.random.Generator = 0,
    *,
    alpha: float,
    num_classes: int | None = None,
) -> ClientIndex:
    """Label skew: client proportions q_c ~ Dir(alpha * global label prior), equal client sizes
    len // num_clients, examples drawn without replacement (FedNLP).

    Small alpha gives near single-class clients, large alpha the global mix. When a class runs
    out, the client's remaining draw is renormalised over the classes that still have examples,
    so later clients can be a little less skewed than their q_c.
    """
    if not 0 < alpha < math.inf:
        raise DataError(f"dirichlet alpha must be a finite number > 0, got {alpha}")
    labels, n_c = _check_counts(labels, num_clients)
    k = int(num_classes or labels.max() + 1)
    rng = _rng(seed)
    prior = np.bincount(labels, minlength=k) / len(labels)
    remaining = np.bincount(labels, minlength=k).astype(np.int64)
    size = len(labels) // n_c
    counts = np.zeros((n_c, k), dtype=np.int64)
    present = prior > 0
    for c in range(n_c):
        q = np.zeros(k)
        q[present] = rng.dirichlet(alpha * prior[present])
        need = size
        while need > 0:
            p = np.where(remaining > 0, q, 0.0)
            if p.sum() <= 0:  # q puts (numerically) no mass on what is left: fall back to prior
                p = np.where(remaining > 0, prior, 0.0)
            draw = np.minimum(rng.multinomial(need, p / p.sum()), remaining)
            counts[c] += draw
            remaining -= draw
            need -= int(draw.sum())
    pools = _class_pools(labels, k, rng)
    return validate_partition(_draw_from_pools(pools, counts, len(labels)), len(labels))


def majority(
    labels: np.ndarray,
    num_clients: int,
    seed: int | np.random.Generator = 0,
    *,
    p: float,
    k: int = 2,
    client_size: int | None = None,
    num_classes: int | None = None,
    majors: Sequence[Sequence[int]] | None = None,
) -> ClientIndex:
    """Each client: k majority classes holding exactly round(p * n) of its n examples (split as
    evenly as possible between them), the rest spread evenly over the other classes (paper 2).

    Majority classes are dealt from a seeded class permutation in turn, so every class is a
    majority class about equally often — unless `majors` names each client's majority classes
    (e.g. `ordered_pairs`, the paper's overlapping pairs); repeats collapse, so a pair (a, a) is
    a single-class client with all round(p * n) majority examples in class a.
    `client_size` defaults to len(labels) // num_clients.
    """
    labels, n_c = _check_counts(labels, num_clients)
    n_classes = int(num_classes or labels.max() + 1)
    if not 0.0 <= p <= 1.0:
        raise DataError(f"majority p must be in [0, 1], got {p}")
    if not 1 <= k < n_classes:
        raise DataError(
            f"majority k must be in [1, num_classes - 1] = [1, {n_classes - 1}], got {k}"
        )
    n = client_size if client_size is not None else len(labels) // n_c
    if n < 1:
        raise DataError(f"client_size must be >= 1, got {n}")
    if n * n_c > len(labels):
        raise DataError(f"{n_c} clients x {n} examples exceeds the {len(labels)} examples")
    if majors is not None:
        if len(majors) != n_c:
            raise DataError(f"majors names {len(majors)} clients, expected {n_c}")
        flat = np.concatenate([np.asarray(m, dtype=np.int64).ravel() for m in majors])
        if flat.size == 0 or flat.min() < 0 or flat.max() >= n_classes:
            raise DataError(f"majors must be class ids in [0, {n_classes - 1}]")
    rng = _rng(seed)
    order = rng.permutation(n_classes)
    n_major = int(round(p * n))
    counts = np.zeros((n_c, n_classes), dtype=np.int64)
    for c in range(n_c):
        if majors is None:
            major = order[(c * k + np.arange(k)) % n_classes]
        else:
            major = np.unique(np.asarray(majors[c], dtype=np.int64))
        m = len(major)
        minor = np.setdiff1d(np.arange(n_classes), major)
        counts[c, major] = n_major // m
        counts[c, major[: n_major % m]] += 1
        n_minor = n - n_major
        counts[c, minor] = n_minor // len(minor)
        counts[c, rng.choice(minor, n_minor % len(minor), replace=False)] += 1
    pools = _class_pools(labels, n_classes, rng)
    return validate_partition(_draw_from_pools(pools, counts, len(labels)), len(labels))


def ordered_pairs(num_clients: int, num_classes: int) -> list[tuple[int, int]]:
    """Paper 2's overlapping majority pairs: client i gets the i-th ordered pair (a, b) of
    `itertools.product(range(K), repeat=2)`, i.e. (i // K, i % K), cycling after K² clients.
    With K = 10 and 100 clients every ordered pair appears once, so each class is a majority
    class of 19 clients and the 10 pairs (a, a) are single-majority-class clients."""
    return [((i // num_classes) % num_classes, i % num_classes) for i in range(num_clients)]


def natural(
    labels: np.ndarray,
    num_clients: int | None = None,
    seed: int | np.random.Generator = 0,
    *,
    groups: np.ndarray | Sequence[Any],
) -> ClientIndex:
    """One client per distinct value of `groups` (e.g. blog author), in sorted group order."""
    if groups is None:
        raise DataError("partition 'natural' needs per-example groups (e.g. blog authors), "
                        "and this data has none: use task blog10 / blog50 or another partition")
    groups = np.asarray(groups)
    if len(groups) != len(labels):
        raise DataError(f"groups has {len(groups)} rows, labels has {len(labels)}")
    values, client_of = np.unique(groups, return_inverse=True)
    if num_clients is not None and num_clients != len(values):
        raise DataError(
            f"natural partition has {len(values)} groups, but num_clients={num_clients}"
        )
    return validate_partition(ClientIndex.from_assignment(client_of.reshape(-1), len(values)),
                              len(labels))


def quantity_skew(
    labels: np.ndarray,
    num_clients: int,
    seed: int | np.random.Generator = 0,
    *,
    beta: float,
) -> ClientIndex:
    """Client sizes 1 + round(q * (len - N)) with q ~ Dir(beta) (at least 1 each, all examples
    used), IID labels (FedNLP's quantity skew). Small beta: a few large clients."""
    if not 0 < beta < math.inf:
        raise DataError(f"quantity_skew beta must be a finite number > 0, got {beta}")
    labels, n_c = _check_counts(labels, num_clients)
    rng = _rng(seed)
    # largest-remainder rounding of q * (n - N): no sampling noise on top of the Dirichlet, so a
    # large beta gives equal sizes (+-1) and every example is used
    share = rng.dirichlet(np.full(n_c, float(beta))) * (len(labels) - n_c)
    extra = np.floor(share).astype(np.int64)
    short = len(labels) - n_c - int(extra.sum())
    extra[np.argsort(extra - share, kind="stable")[:short]] += 1
    sizes = 1 + extra
    client_of = np.empty(len(labels), dtype=np.int64)
    client_of[rng.permutation(len(labels))] = np.repeat(np.arange(n_c), sizes)
    return validate_partition(ClientIndex.from_assignment(client_of, n_c), len(labels))


@dataclass(frozen=True)
class _Spec:
    fn: Callable[..., ClientIndex]
    required: tuple[str, ...]
    optional: tuple[str, ...]


PARTITIONERS: dict[str, _Spec] = {
    "iid": _Spec(iid, (), ()),
    "label_sorted": _Spec(label_sorted, (), ()),
    "dirichlet": _Spec(dirichlet, ("alpha",), ("num_classes",)),
    "majority": _Spec(majority, ("p",), ("k", "client_size", "num_classes")),
    "natural": _Spec(natural, ("groups",), ()),
    "quantity_skew": _Spec(quantity_skew, ("beta",), ()),
}


def list_partitioners() -> list[str]:
    return sorted(PARTITIONERS)


def make_partitioner(name: str, **params: Any) -> Partitioner:
    """`partitioner(labels, num_clients, seed)` with `params` bound; checks names and values now,
    so a bad sweep config fails before any data is loaded."""
    if name not in PARTITIONERS:
        raise DataError(f"unknown partitioner {name!r}; valid: {', '.join(list_partitioners())}")
    spec = PARTITIONERS[name]
    missing = [p for p in spec.required if p not in params]
    unknown = [p for p in params if p not in spec.required + spec.optional]
    if missing or unknown:
        raise DataError(
            f"partitioner {name!r}: missing {missing}, unknown {unknown}; "
            f"takes {list(spec.required)} (required) and {list(spec.optional)} (optional)"
        )
    checks = {  # (valid?, what valid is); inf is no concentration a sampler can draw from
        "alpha": (lambda v: 0 < v < math.inf, "a finite number > 0"),
        "beta": (lambda v: 0 < v < math.inf, "a finite number > 0"),
        "p": (lambda v: 0.0 <= v <= 1.0, "in [0, 1]"),
        "k": (lambda v: int(v) == v and v >= 1, "an integer >= 1"),
        "client_size": (lambda v: v is None or (int(v) == v and v >= 1), "an integer >= 1"),
        "num_classes": (lambda v: v is None or (int(v) == v and v >= 2), "an integer >= 2"),
    }
    for key, value in params.items():
        if key in checks and not checks[key][0](value):
            raise DataError(
                f"partitioner {name!r}: invalid {key}={value!r}; it must be {checks[key][1]}"
            )
    return partial(spec.fn, **params)


@dataclass(frozen=True)
class ClientSplits:
    """Per-client train / validation / test index arrays (into the same split as the partition)."""

    train: Partition
    val: Partition
    test: Partition


def split_clients(
    partition: Sequence[np.ndarray],
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
) -> ClientSplits:
    """Split each client's examples into train / val / test (seeded, per client) for
    personalisation (local validation for early stopping, local test for the client's own
    distribution). The global test set is separate and untouched."""
    for name, f in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= f < 1.0:
            raise DataError(f"{name} must be in [0, 1), got {f}")
    if val_fraction + test_fraction >= 1.0:
        raise DataError(
            f"val_fraction + test_fraction must be < 1, got {val_fraction + test_fraction}"
        )
    train, val, test = [], [], []
    for c, idx in enumerate(partition):
        perm = np.random.default_rng((seed, c)).permutation(np.asarray(idx, dtype=np.int64))
        n_val, n_test = int(round(val_fraction * len(perm))), int(round(test_fraction * len(perm)))
        if len(perm) - n_val - n_test < 1:
            raise DataError(
                f"client {c} was left with zero training examples ({len(perm)} examples, "
                f"{n_val} val, {n_test} test)"
            )
        val.append(np.sort(perm[:n_val]))
        test.append(np.sort(perm[n_val : n_val + n_test]))
        train.append(np.sort(perm[n_val + n_test :]))
    return ClientSplits(train, val, test)
