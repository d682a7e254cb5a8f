"""Partitions of populations of 10^4-10^5 clients as flat arrays: exact counts, and the same
partitions as the per-client lists they replace."""

from __future__ import annotations

import numpy as np
import pytest

from fedjax_lm.data import ClientIndex, DataError, make_partitioner, validate_partition


def _check_exact(index: ClientIndex, num_examples: int, every: bool) -> None:
    """Every example in at most (`every`: exactly) one client; clients sorted, none empty."""
    counts = np.bincount(index.order, minlength=num_examples)
    assert counts.max() == 1 and (counts.min() == 1 if every else True)
    assert int(index.sizes.sum()) == len(index.order) and (index.sizes > 0).all()
    assert index.offsets[0] == 0 and index.offsets[-1] == len(index.order)
    inside = np.ones(len(index.order), bool)
    inside[index.offsets[1:-1] - 1] = False  # pairs that straddle a client boundary
    assert (np.diff(index.order)[inside[:-1]] > 0).all()  # ascending within each client


@pytest.mark.parametrize("name, params, every", [
    ("iid", {}, True),  # 3 examples a client: 300,000 divide evenly
    ("label_sorted", {}, True),
    ("quantity_skew", {"beta": 0.5}, True),  # power-law-like sizes, all examples used
])
def test_population_of_100k_clients_places_every_example_exactly_once(name, params, every):
    n_clients, n = 100_000, 300_000
    labels = np.random.default_rng(0).integers(0, 2, n)
    index = make_partitioner(name, **params)(labels, n_clients, 0)
    assert isinstance(index, ClientIndex) and len(index) == n_clients
    _check_exact(index, n, every)


def test_natural_partition_of_100k_authors_is_one_client_per_group():
    rng = np.random.default_rng(1)
    groups = rng.permutation(np.arange(250_000) % 100_000)  # 2-3 posts per author
    index = make_partitioner("natural", groups=groups)(np.zeros(250_000, np.int64), None, 0)
    assert len(index) == 100_000
    _check_exact(index, 250_000, every=True)
    for c in (0, 4_242, 99_999):  # client c is group c (sorted group order)
        assert np.array_equal(index[c], np.flatnonzero(groups == c))


def test_dirichlet_population_of_5k_clients_is_exact():
    labels = np.random.default_rng(2).integers(0, 2, 15_000)
    index = make_partitioner("dirichlet", alpha=0.5)(labels, 5_000, 0)
    assert (index.sizes == 3).all()
    _check_exact(index, 15_000, every=True)


def test_client_index_reads_like_the_list_of_arrays():
    parts = [np.array([5, 1]), np.array([0]), np.array([7, 3, 2])]
    index = ClientIndex.from_arrays(parts)
    assert len(index) == 3 and [p.tolist() for p in index] == [[1, 5], [0], [2, 3, 7]]
    assert index[-1].tolist() == [2, 3, 7] and [p.tolist() for p in index[1:]] == [[0], [2, 3, 7]]
    same = ClientIndex.from_assignment(np.array([1, 0, 2, 2, -1, 0, -1, 2]), 3)
    assert [p.tolist() for p in same] == [p.tolist() for p in index]
    picked = index.select(np.array([2, 0]))
    assert [p.tolist() for p in picked] == [[2, 3, 7], [1, 5]]
    with pytest.raises(IndexError):
        index[3]
    with pytest.raises(DataError, match="client 1 was left with zero examples"):
        validate_partition([np.array([0]), np.array([], np.int64)], 4)
    with pytest.raises(DataError, match="puts an example in two clients"):
        validate_partition([np.array([0, 1]), np.array([1])], 4)
