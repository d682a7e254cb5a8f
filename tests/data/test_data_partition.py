"""Partitioners on the real IMDB / blog fixtures: exact sizes and label histograms."""

from __future__ import annotations

import numpy as np
import pytest

from fedjax_lm.data import (
    DataError,
    dirichlet,
    iid,
    label_sorted,
    list_partitioners,
    majority,
    make_partitioner,
    natural,
    ordered_pairs,
    quantity_skew,
    split_clients,
)


def _hist(labels: np.ndarray, part: list[np.ndarray], k: int) -> np.ndarray:
    return np.stack([np.bincount(labels[idx], minlength=k) for idx in part])


def _assert_disjoint(part: list[np.ndarray], n: int) -> None:
    flat = np.concatenate(part)
    assert len(np.unique(flat)) == len(flat)
    assert flat.min() >= 0 and flat.max() < n
    assert all(len(p) > 0 for p in part)


def test_registry_names() -> None:
    expected = ["dirichlet", "iid", "label_sorted", "majority", "natural", "quantity_skew"]
    assert list_partitioners() == expected


def test_iid_equal_shards_remainder_dropped(imdb_fixture) -> None:
    y = imdb_fixture.train.labels  # 200 examples, 100 per class
    part = iid(y, 3, seed=0)
    assert [len(p) for p in part] == [66, 66, 66]
    _assert_disjoint(part, 200)
    assert _hist(y, part, 2).sum() == 198
    assert all(np.array_equal(a, b) for a, b in zip(part, iid(y, 3, seed=0), strict=True))
    assert not np.array_equal(part[0], iid(y, 3, seed=1)[0])


def test_label_sorted_contiguous_chunks(imdb_fixture) -> None:
    y = imdb_fixture.train.labels
    part = label_sorted(y, 4)
    assert _hist(y, part, 2).tolist() == [[50, 0], [50, 0], [0, 50], [0, 50]]
    # stable: chunk 0 is the first 50 negatives in file order
    assert np.array_equal(part[0], np.flatnonzero(y == 0)[:50])
    assert _hist(y, label_sorted(y, 3), 2).tolist() == [[66, 0], [34, 32], [0, 66]]


def test_dirichlet_sizes_and_skew(blog_fixture) -> None:
    y = blog_fixture.train.labels  # 160 examples, 16 per author, 10 classes
    for alpha in (0.05, 1000.0):
        part = dirichlet(y, 8, seed=0, alpha=alpha)
        assert [len(p) for p in part] == [20] * 8
        _assert_disjoint(part, 160)

    def mean_max_fraction(alpha: float) -> float:
        # 16 clients of 10: small enough that one class (16 examples) can fill a client
        fractions = []
        for seed in range(3):
            h = _hist(y, dirichlet(y, 16, seed=seed, alpha=alpha), 10)
            fractions.append((h.max(1) / h.sum(1)).mean())
        return float(np.mean(fractions))

    # small alpha: clients dominated by one class; large alpha: near the (uniform) global prior,
    # whose expected max fraction for 10 draws over 10 classes is ~0.27
    assert mean_max_fraction(0.05) > 0.7
    assert mean_max_fraction(1000.0) < 0.4
    a, b = dirichlet(y, 8, seed=0, alpha=0.05), dirichlet(y, 8, seed=0, alpha=0.05)
    assert all(np.array_equal(x, z) for x, z in zip(a, b, strict=True))


def test_dirichlet_skew_monotone_in_alpha(imdb_fixture) -> None:
    y = imdb_fixture.train.labels
    fracs = []
    for alpha in (0.1, 1.0, 100.0):
        vals = []
        for seed in range(5):
            h = _hist(y, dirichlet(y, 10, seed=seed, alpha=alpha), 2)
            vals.append((h.max(1) / h.sum(1)).mean())
        fracs.append(np.mean(vals))
    assert fracs[0] > fracs[1] > fracs[2]
    assert fracs[2] < 0.65 and fracs[0] > 0.8


@pytest.mark.parametrize("p", [0.0, 0.3, 0.8, 1.0])
def test_majority_hits_p_exactly(blog_fixture, p: float) -> None:
    y = blog_fixture.train.labels  # 10 classes x 16
    n, k, n_classes = 20, 2, 10
    part = majority(y, 5, seed=0, p=p, k=k, client_size=n)
    _assert_disjoint(part, 160)
    h = _hist(y, part, n_classes)
    assert h.sum(1).tolist() == [n] * 5
    m = round(p * n)  # majority examples per client, split evenly between the k classes
    rest, others = n - m, n_classes - k
    expected = sorted([m // k] * k + [rest // others + (j < rest % others) for j in range(others)])
    for c in range(5):
        assert sorted(h[c].tolist()) == expected
    if p >= 0.5:
        assert (np.sort(h, axis=1)[:, -k:].sum(1) == m).all()  # exactly p of every client
    if p == 1.0:  # majority classes are dealt in turn: 5 clients x 2 = every class once
        assert (h.sum(0) == n // k).all()


def test_majority_with_the_papers_ordered_pairs() -> None:
    """Paper 2's overlapping pairs: client i's majority classes are (i // K, i % K); a pair
    (a, a) is a single-class client holding all round(p * n) majority examples in class a."""
    k, n, p = 4, 20, 0.8
    pairs = ordered_pairs(16, k)
    assert pairs[:6] == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1)]
    assert len(set(pairs)) == 16 and ordered_pairs(17, k)[16] == (0, 0)  # cycles after K²
    y = np.repeat(np.arange(k), 200)
    part = majority(y, 16, seed=0, p=p, client_size=n, majors=pairs)
    _assert_disjoint(part, len(y))
    h = _hist(y, part, k)
    for c, (a, b) in enumerate(pairs):
        if a == b:
            assert h[c, a] == 16 and sorted(np.delete(h[c], a).tolist()) == [1, 1, 2]
        else:  # 8 + 8 majority, the other 4 spread evenly over the 2 other classes
            assert h[c, a] == 8 and h[c, b] == 8 and np.delete(h[c], [a, b]).tolist() == [2, 2]
    with pytest.raises(DataError, match="majors names 3 clients, expected 16"):
        majority(y, 16, seed=0, p=p, client_size=n, majors=pairs[:3])
    with pytest.raises(DataError, match=r"majors must be class ids in \[0, 3\]"):
        majority(y, 16, seed=0, p=p, client_size=n, majors=[(0, 4)] * 16)


def test_majority_k1_on_imdb(imdb_fixture) -> None:
    y = imdb_fixture.train.labels
    part = majority(y, 4, seed=3, p=0.75, k=1)
    h = _hist(y, part, 2)
    assert sorted(h.max(1).tolist()) == [38, 38, 38, 38]  # round(0.75 * 50) = 38 (banker's: 37.5)
    assert h.sum(1).tolist() == [50] * 4


def test_natural_one_client_per_author(blog_fixture) -> None:
    tr = blog_fixture.train
    part = natural(tr.labels, groups=tr.groups)
    assert [len(p) for p in part] == [16] * 10
    assert _hist(tr.labels, part, 10).tolist() == np.eye(10, dtype=int).__mul__(16).tolist()
    with pytest.raises(DataError, match="10 groups, but num_clients=4"):
        natural(tr.labels, 4, groups=tr.groups)


def test_quantity_skew_sizes(imdb_fixture) -> None:
    y = imdb_fixture.train.labels
    part = quantity_skew(y, 10, seed=0, beta=0.2)
    sizes = np.array([len(p) for p in part])
    assert sizes.sum() == 200 and sizes.min() >= 1
    _assert_disjoint(part, 200)
    assert sizes.max() > 3 * np.median(sizes)  # skewed
    even = np.array([len(p) for p in quantity_skew(y, 10, seed=0, beta=1e4)])
    assert even.min() >= 19 and even.max() <= 21  # equal (+-1) for large beta


def test_make_partitioner_binds_params(blog_fixture) -> None:
    tr = blog_fixture.train
    fn = make_partitioner("dirichlet", alpha=0.5)
    assert all(
        np.array_equal(a, b)
        for a, b in zip(fn(tr.labels, 4, 7), dirichlet(tr.labels, 4, 7, alpha=0.5), strict=True)
    )
    nat = make_partitioner("natural", groups=tr.groups)
    assert len(nat(tr.labels, None, 0)) == 10


def test_split_clients_per_client_fractions(imdb_fixture) -> None:
    part = iid(imdb_fixture.train.labels, 4, seed=0)  # 4 x 50
    s = split_clients(part, val_fraction=0.2, test_fraction=0.2, seed=1)
    for c in range(4):
        assert (len(s.train[c]), len(s.val[c]), len(s.test[c])) == (30, 10, 10)
        joined = np.concatenate([s.train[c], s.val[c], s.test[c]])
        assert np.array_equal(np.sort(joined), part[c])
    again = split_clients(part, val_fraction=0.2, test_fraction=0.2, seed=1)
    assert np.array_equal(again.val[2], s.val[2])
