"""Loading every registered task from the shared offline data (and the user's own files)."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fedjax_lm.data import DataError, list_tasks, load_task
from fedjax_lm.data.task_data import subsample


def test_registry_lists_all_tasks() -> None:
    expected = {"imdb", "ag_news", "yelp5", "blog10", "blog50", "sst2", "20news", "cifar10"}
    assert expected | {"synthetic", "synthetic_population", "csv"} == set(list_tasks())


def test_imdb_fixture_official_split_and_cleaning(imdb_fixture) -> None:
    task = imdb_fixture
    assert (len(task.train), len(task.test)) == (200, 100)
    assert task.num_classes == 2 and task.label_names == ("neg", "pos")
    assert task.label_histogram("train").tolist() == [100, 100]
    assert task.label_histogram("test").tolist() == [50, 50]
    assert task.train.labels.dtype == np.int32
    assert not any("<br" in t for t in task.train.texts + task.test.texts)
    # the first review had "<br /><br />" between two sentences: now a single space
    assert "IMDb as of today. Kathryn Bigelow" in task.train.texts[0]


def test_imdb_full_from_data_dir(shared_data: Path, cache_dir: Path) -> None:
    task = load_task("imdb", shared_data, cache_dir=cache_dir)
    assert (len(task.train), len(task.test)) == (25000, 25000)
    assert task.label_histogram("train").tolist() == [12500, 12500]


def test_imdb_data_dir_from_env(
    shared_data: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FEDJAX_LM_DATA_DIR", str(shared_data))
    task = load_task("imdb", cache_dir=cache_dir, max_train=100, max_test=50, seed=3)
    assert (len(task.train), len(task.test)) == (100, 50)
    again = load_task("imdb", cache_dir=cache_dir, max_train=100, max_test=50, seed=3)
    assert again.train.texts == task.train.texts


def test_blog_fixture_per_author_split(blog_fixture) -> None:
    task = blog_fixture
    assert task.num_classes == 10 and len(task.label_names) == 10
    assert (len(task.train), len(task.test)) == (160, 40)
    assert task.label_histogram("train").tolist() == [16] * 10
    assert task.label_histogram("test").tolist() == [4] * 10
    # group column = author id, consistent with the label
    for split in (task.train, task.test):
        assert [task.label_names[y] for y in split.labels] == list(split.groups)
    # about 1 in 5 fixture posts is a verbatim copy under another author (see dedupe)
    assert len(set(task.train.texts) | set(task.test.texts)) == 160


def test_blog_dedupe_drops_every_repeated_text(shared_data: Path, cache_dir: Path) -> None:
    path = shared_data / "blog" / "blog_fixture_10x20.csv"
    task = load_task("blog10", path=path, cache_dir=cache_dir, dedupe=True)
    assert task.info["duplicates_dropped"] == 80  # 40 texts, each under 2 authors
    assert len(task.train) + len(task.test) == 120
    texts = task.train.texts + task.test.texts
    assert len(set(texts)) == len(texts)


def test_blog_split_is_seeded(shared_data: Path, cache_dir: Path) -> None:
    path = shared_data / "blog" / "blog_fixture_10x20.csv"
    a = load_task("blog10", path=path, cache_dir=cache_dir, seed=1)
    b = load_task("blog10", path=path, cache_dir=cache_dir, seed=1)
    c = load_task("blog10", path=path, cache_dir=cache_dir, seed=2)
    assert a.test.texts == b.test.texts
    assert a.test.texts != c.test.texts


def test_blog10_full(shared_data: Path, cache_dir: Path) -> None:
    task = load_task("blog10", shared_data, cache_dir=cache_dir)
    assert task.num_classes == 10
    assert len(task.train) + len(task.test) == 23504
    hist = task.label_histogram("train") + task.label_histogram("test")
    assert hist.min() >= 1842 and hist.max() == 4219


def test_ag_news(shared_data: Path, cache_dir: Path) -> None:
    task = load_task("ag_news", shared_data, cache_dir=cache_dir)
    assert (len(task.train), len(task.test)) == (10001, 7600)
    assert task.label_names == ("World", "Sports", "Business", "Sci/Tech")
    assert task.label_histogram("train").tolist() == [2509, 2458, 2496, 2538]
    assert task.label_histogram("test").tolist() == [1900] * 4
    # csv quoting is undone: the second line's inner quotes are single again
    assert any('said on Tuesday "major neglect"' in t for t in task.train.texts)


def test_sst2(shared_data: Path, cache_dir: Path) -> None:
    task = load_task("sst2", shared_data, cache_dir=cache_dir)
    assert (len(task.train), len(task.test)) == (60614, 872)
    assert task.label_histogram("test").tolist() == [428, 444]
    assert task.test.texts[0] == "it 's a charming and often affecting journey ."


def test_yelp5_stars_to_0_4(shared_data: Path, cache_dir: Path) -> None:
    task = load_task("yelp5", shared_data, cache_dir=cache_dir)
    assert (len(task.train), len(task.test)) == (5000, 5000)
    assert task.label_histogram("train").tolist() == [750, 435, 516, 1111, 2188]


def test_20news(shared_data: Path, cache_dir: Path) -> None:
    task = load_task("20news", shared_data, cache_dir=cache_dir)
    assert (len(task.train), len(task.test)) == (11314, 7532)
    assert task.num_classes == 20 and task.label_names[0] == "alt.atheism"


def test_synthetic_deterministic_and_learnable() -> None:
    kw = dict(num_classes=3, num_train=300, num_test=90, label_noise=0.2)
    a = load_task("synthetic", seed=5, **kw)
    b = load_task("synthetic", seed=5, **kw)
    c = load_task("synthetic", seed=6, **kw)
    assert a.train.texts == b.train.texts and np.array_equal(a.train.labels, b.train.labels)
    assert a.train.texts != c.train.texts
    assert a.num_classes == 3 and a.label_histogram("test").tolist() == [30, 30, 30]
    keywords = a.info["keywords"]

    def keyword_vote(text: str) -> int:
        words = text.split()
        return int(np.argmax([sum(w in set(kws) for w in words) for kws in keywords]))

    test_pred = np.array([keyword_vote(t) for t in a.test.texts])
    assert (test_pred == a.test.labels).mean() == 1.0  # the signal is exact on clean labels
    train_pred = np.array([keyword_vote(t) for t in a.train.texts])
    flipped = int((train_pred != a.train.labels).sum())
    assert flipped == a.info["flipped_train_labels"]
    assert 0.1 < flipped / 300 < 0.3  # label noise 0.2


def test_cifar10_subset_and_cache(shared_data: Path, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from fedjax_lm.data import tasks

    monkeypatch.setattr(tasks, "_LOADED_MAX", 0)  # the disk cache under test, not the process's
    task = load_task("cifar10", shared_data, cache_dir=tmp_path, per_class=3)
    assert task.modality == "image" and task.num_classes == 10
    assert task.train.images.shape == (30, 32, 32, 3) and task.train.images.dtype == np.uint8
    assert task.test.images.shape == (30, 32, 32, 3)
    assert task.train.labels.tolist() == [c for c in range(10) for _ in range(3)]
    assert task.label_names[0] == "airplane" and task.label_names[9] == "truck"
    assert not task.info["cache_hit"]
    assert 20 < task.train.images.mean() < 235  # real pixels, not blank
    again = load_task("cifar10", shared_data, cache_dir=tmp_path, per_class=3)
    assert again.info["cache_hit"]
    assert np.array_equal(again.train.images, task.train.images)
    (entry,) = (tmp_path / "cifar10").glob("*.npz")
    entry.write_bytes(entry.read_bytes()[:1000])  # a copy cut short: rebuilt, not trusted
    rebuilt = load_task("cifar10", shared_data, cache_dir=tmp_path, per_class=3)
    assert not rebuilt.info["cache_hit"]
    assert np.array_equal(rebuilt.train.images, task.train.images)
    assert load_task("cifar10", shared_data, cache_dir=tmp_path, per_class=3).info["cache_hit"]


@pytest.mark.slow
def test_cifar10_full_decode(shared_data: Path, tmp_path: Path) -> None:
    task = load_task("cifar10", shared_data, cache_dir=tmp_path)
    assert task.train.images.shape == (50000, 32, 32, 3)
    assert task.test.images.shape == (10000, 32, 32, 3)
    assert task.label_histogram("train").tolist() == [5000] * 10
    assert task.label_histogram("test").tolist() == [1000] * 10


def test_hub_fallback_offline_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FEDJAX_LM_DATA_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_network(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", no_network)
    for name in ("imdb", "ag_news", "sst2", "cifar10", "blog10"):
        with pytest.raises(DataError) as e:
            load_task(name)
        msg = str(e.value)
        assert "FEDJAX_LM_DATA_DIR" in msg and "data_dir" in msg, msg
    with pytest.raises(DataError, match=r"<data_dir>/imdb/imdb_50k\.parquet.*hub dataset 'imdb'"):
        load_task("imdb")


# --- the user's own files ("csv" task) ---------------------------------------------------------


def test_csv_task_named_labels(tmp_path: Path) -> None:
    train = tmp_path / "train.csv"
    train.write_text("text,label\nhello there,spam\nsee you,ham\nbuy now,spam\nok,ham\n")
    test = tmp_path / "test.tsv"
    test.write_text("text\tlabel\ncheap pills\tspam\nlunch?\tham\n")
    task = load_task("csv", train_file=str(train), test_file=str(test))
    assert task.label_names == ("ham", "spam")
    assert task.info["label_mapping"] == {"ham": 0, "spam": 1}
    assert task.train.labels.tolist() == [1, 0, 1, 0]
    assert task.test.labels.tolist() == [1, 0]
    assert task.test.texts == ["cheap pills", "lunch?"]


def test_csv_task_int_labels_json_parquet_custom_columns(tmp_path: Path) -> None:
    train = tmp_path / "train.jsonl"
    rows = [{"body": f"text {i}", "y": i % 3} for i in range(9)]
    train.write_text("\n".join(json.dumps(r) for r in rows))
    test = tmp_path / "test.parquet"
    pq.write_table(pa.table({"body": ["a", "b", "c"], "y": [2, 1, 0]}), test)
    task = load_task(
        "csv", train_file=str(train), test_file=str(test), text_column="body", label_column="y"
    )
    assert task.num_classes == 3 and task.info["label_mapping"] is None
    assert task.train.labels.tolist() == [0, 1, 2] * 3
    assert task.test.texts == ["a", "b", "c"]


def test_csv_task_without_test_file_holds_out_seeded_fraction(tmp_path: Path) -> None:
    train = tmp_path / "all.csv"
    train.write_text("text,label\n" + "".join(f"row {i},{i % 2}\n" for i in range(50)))
    a = load_task("csv", train_file=str(train), test_fraction=0.2, seed=1)
    b = load_task("csv", train_file=str(train), test_fraction=0.2, seed=1)
    assert (len(a.train), len(a.test)) == (40, 10)
    assert a.test.texts == b.test.texts
    assert not set(a.train.texts) & set(a.test.texts)


def _counting_task(monkeypatch: pytest.MonkeyPatch, seeded: bool) -> list[int | None]:
    """A registered task 'counted' that reads its --path file and records each loader call."""
    from fedjax_lm.data import registry, tasks
    from fedjax_lm.data.task_data import Split, TaskData

    calls: list[int | None] = []

    def loader(ctx):
        calls.append(ctx.seed if seeded else None)
        rows = Path(ctx.path).read_text().split()
        split = Split(labels=np.arange(len(rows), dtype=np.int32) % 2, texts=rows)
        return TaskData("counted", split, split, 2, ("a", "b"))

    monkeypatch.setitem(registry.TASKS, "counted", registry.TaskSpec(
        "counted", loader, (), None, needs_data=False, seeded=seeded))
    monkeypatch.setattr(tasks, "_LOADED", type(tasks._LOADED)())
    return calls


def test_load_task_shares_one_load_across_seeds_and_rereads_an_edited_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _counting_task(monkeypatch, seeded=False)
    file = tmp_path / "rows.txt"
    file.write_text("a b c d e f")
    subsets = {seed: load_task("counted", path=file, max_train=3, seed=seed).train.texts
               for seed in range(4)}
    assert len(calls) == 1  # one load; each seed still draws its own subset from it
    assert len({tuple(t) for t in subsets.values()}) > 1
    whole = load_task("counted", path=file, seed=0).train
    assert subsets == {seed: subsample(whole, 3, seed).texts for seed in range(4)}
    with pytest.raises(ValueError, match="read-only"):
        load_task("counted", path=file, seed=0).train.labels[0] = 1
    file.write_text("a b c d e f g h")  # another size: read again
    assert len(load_task("counted", path=file, seed=0).train) == 8
    assert len(calls) == 2


def test_seeded_task_loads_once_per_seed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _counting_task(monkeypatch, seeded=True)
    file = tmp_path / "rows.txt"
    file.write_text("a b c")
    for seed in (0, 1, 0):
        load_task("counted", path=file, seed=seed)
    assert calls == [0, 1]


def test_unseeded_loader_reading_its_seed_is_a_programming_error() -> None:
    from fedjax_lm.data.registry import LoadContext

    with pytest.raises(TypeError, match="register it with seeded=True"):
        _ = LoadContext("imdb", None, None, None, loader_seed=None).seed


def test_synthetic_population_task_is_the_population_generator(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedjax_lm.data import synthetic

    monkeypatch.setattr(synthetic, "POPULATION_EXAMPLES", 5000)  # the real one: 1,000,000
    task = load_task("synthetic_population", seed=3, num_test=50)
    direct = synthetic.synthetic_population(5000, 50, seed=3)
    assert (len(task.train), len(task.test)) == (5000, 50)
    assert task.train.texts == direct.train.texts
    assert np.array_equal(task.train.labels, direct.train.labels)
    assert len(load_task("synthetic_population", seed=3, num_test=50, max_train=700).train) == 700


@pytest.mark.parametrize("generator", ["make_synthetic", "synthetic_population"])
@pytest.mark.parametrize(("param", "value", "message"), [
    ("keyword_rate", 0.0, "keyword_rate must be in (0, 1], got 0.0"),
    ("label_noise", 1.0, "label_noise must be in [0, 1), got 1.0"),
    ("num_classes", 1, "num_classes must be >= 2, got 1"),
])
def test_both_synthetic_generators_check_their_parameters(
    generator: str, param: str, value: float, message: str
) -> None:
    from fedjax_lm.data import synthetic

    make = getattr(synthetic, generator)
    sizes = {"num_train": 10, "num_test": 5}
    with pytest.raises(DataError) as e:
        make(**sizes, **{param: value})
    assert str(e.value) == message
