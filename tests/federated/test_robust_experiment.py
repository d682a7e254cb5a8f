"""The robustness experiment's own pieces: its grid and its traceable bag-of-tokens features."""

from pathlib import Path

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2] / "experiments"


@pytest.fixture(scope="module")
def script(experiment_script):
    return experiment_script("robust_agnews")


def test_grid_runs_each_clean_cell_once(script):
    grid = yaml.safe_load((ROOT / "robust_agnews.yaml").read_text())["grid"]
    cells = script.cells(grid)
    assert len(cells) == len(set(cells)) == 7 * 3 * (1 + 5 * 3)  # 336
    assert sum(attack is None for _, attack, _, _ in cells) == 7 * 3


def test_bag_of_tokens_counts_real_tokens_into_buckets(script):
    ids = np.array([[5, 9, 5, 0], [3, 7, 11, 3]])
    att = np.array([[1, 1, 1, 0], [1, 1, 1, 1]])
    got = np.asarray(script.bag_of_tokens(ids, att, 4))
    counts = np.zeros((2, 4))
    for r in range(2):
        for t, a in zip(ids[r], att[r], strict=True):
            counts[r, t % 4] += a
    want = np.log1p(counts) / np.linalg.norm(np.log1p(counts), axis=1, keepdims=True)
    np.testing.assert_allclose(got, want, rtol=1e-6)
