"""Every bad input is one DataError whose message names the file / column / row / value."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from fedjax_lm.data import (
    DataError,
    dirichlet,
    iid,
    load_task,
    majority,
    make_partitioner,
    natural,
    pack_clients,
    split_clients,
    validate_partition,
)


def _csv(tmp_path: Path, body: str, name: str = "train.csv") -> str:
    path = tmp_path / name
    path.write_text(body)
    return str(path)


def test_data_error_is_value_error() -> None:
    assert issubclass(DataError, ValueError)


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.csv"
    with pytest.raises(DataError, match=f"missing file: {re.escape(str(missing))}"):
        load_task("csv", train_file=str(missing))
    with pytest.raises(DataError, match=r"missing file: .*imdb/imdb_50k\.parquet"):
        load_task("imdb", tmp_path)  # data dir without the expected layout


def test_missing_data_dir(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="data directory .*does-not-exist does not exist"):
        load_task("imdb", tmp_path / "does-not-exist")
    (tmp_path / "a.csv").write_text("text,label\n")
    with pytest.raises(DataError, match="data directory .*a.csv is a file, not a folder"):
        load_task("imdb", tmp_path / "a.csv")


def test_missing_text_column_lists_columns(tmp_path: Path) -> None:
    path = _csv(tmp_path, "review,label\ngood,1\nbad,0\n")
    with pytest.raises(DataError) as e:
        load_task("csv", train_file=path)
    msg = str(e.value)
    assert path in msg and "no text column 'text'" in msg and "['label', 'review']" in msg


def test_missing_label_column_lists_columns(tmp_path: Path) -> None:
    path = _csv(tmp_path, "text,stars\ngood,1\nbad,0\n")
    with pytest.raises(DataError, match=r"no label column 'target'.*\['stars', 'text'\]"):
        load_task("csv", train_file=path, label_column="target")


def test_empty_text_names_row(tmp_path: Path) -> None:
    path = _csv(tmp_path, 'text,label\ngood,1\n"   ",0\nfine,1\n')
    with pytest.raises(DataError, match=r"train\.csv column 'text': empty text in row 1"):
        load_task("csv", train_file=path)
    path = _csv(tmp_path, "text,label\ngood,1\n,0\n", "missing.csv")
    with pytest.raises(DataError, match="empty text in row 1"):
        load_task("csv", train_file=path)


def test_label_not_integer_names_value(tmp_path: Path) -> None:
    path = _csv(tmp_path, "text,label\na,0\nb,1.5\nc,1\n")
    with pytest.raises(DataError, match=r"train\.csv: label 1\.5 in row 1 is not an integer"):
        load_task("csv", train_file=path)


def test_label_out_of_range_names_value(tmp_path: Path) -> None:
    path = _csv(tmp_path, "text,label\na,0\nb,1\nc,7\n")
    with pytest.raises(DataError, match=r"label\(s\) outside 0\.\.1 \(--num-labels 2\): 7 "
                                        r"\(row 2\)"):
        load_task("csv", train_file=path, num_classes=2)
    path = _csv(tmp_path, "text,label\na,0\nb,-1\nc,1\n", "neg.csv")
    with pytest.raises(DataError, match=r"neg\.csv column 'label' has negative label\(s\): -1 "
                                        r"\(row 1\)"):
        load_task("csv", train_file=path)


def test_missing_label_names_row(tmp_path: Path) -> None:
    path = _csv(tmp_path, "text,label\na,0\nb,\nc,1\n")
    with pytest.raises(DataError, match="missing label in row 1"):
        load_task("csv", train_file=path)


def test_not_utf8_names_file(tmp_path: Path) -> None:
    path = tmp_path / "latin1.csv"
    path.write_bytes("text,label\nok,0\ncaf\u00e9,1\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.csv is not valid UTF-8 \(byte 19, line 3\)"):
        load_task("csv", train_file=str(path))


def test_unsupported_extension(tmp_path: Path) -> None:
    path = _csv(tmp_path, "x", "data.xlsx")
    with pytest.raises(DataError, match=r"unsupported file type 'data\.xlsx'; use one of"):
        load_task("csv", train_file=path)


@pytest.mark.parametrize("name, body, message", [
    ("empty.csv", "", r"empty\.csv is empty: it needs a header line and at least one row"),
    ("header.csv", "text,label\n",
     r"header\.csv has a header line \['text', 'label'\] but no rows"),
    ("header.tsv", "text\tlabel\n\n", r"header\.tsv has a header line .* but no rows"),
    ("extra.csv", "text,label\ngood,1\nbad,0,oops\nfine,1\n",
     r"extra\.csv line 3: 3 fields, but the header has 2 \['text', 'label'\]; quote a text "
     r"that contains a comma or remove the extra field"),
    # every row one field too many: pandas would silently read the first column as an index
    ("shifted.csv", "text,label\ngood,1,a\nbad,0,b\n", r"shifted\.csv line 2: 3 fields"),
    ("broken.jsonl", '{"text": "a", "label": 0}\n{"text": "b", "label"\n',
     r"broken\.jsonl line 2: not valid JSON"),
    ("none.json", "[]", r"none\.json holds an empty JSON array: no rows"),
])
def test_file_structure_names_file_line_and_cause(tmp_path: Path, name: str, body: str,
                                                  message: str) -> None:
    with pytest.raises(DataError, match=message) as err:
        load_task("csv", train_file=_csv(tmp_path, body, name))
    assert "\n" not in str(err.value)


def _rows(labels: list) -> str:
    return "text,label\n" + "".join(f"review {i},{label}\n" for i, label in enumerate(labels))


@pytest.mark.parametrize("labels, message", [
    ([0, 1] * 10 + [1000000], r"gap \(999998 values from 2 to 999999 never occur\): 1000000 "
                              r"\(row 20\); .* --num-labels K"),
    ([1] * 20, r"has a single class \(1 in all 20 rows\)"),
    ([0, 1] * 10 + ["pos"], r"a mix of numbers and names \(mostly numbers\): 'pos' \(row 20\)"),
    (["neg", "pos"] * 10 + [0, 1], r"a mix of numbers and names \(mostly names\): 0 \(row 20\), "
                                   r"1 \(row 21\)"),
    ([1, 2, 3] * 5, r"\(0 never occurs\): .*labels 1\.\.3 look 1-based: renumber them 0\.\.2, "
                    r"or use them as names with --label-names 1,2,3"),
    ([0, 1, -1, 1], r"negative label\(s\): -1 \(row 2\)"),
    (list(range(30)), r"looks like texts or ids, not labels: 30 distinct values in 30 rows"),
])
def test_suspicious_label_columns_are_refused_with_values_and_rows(
    tmp_path: Path, labels: list, message: str
) -> None:
    with pytest.raises(DataError, match=r"train\.csv column 'label' .*" + message):
        load_task("csv", train_file=_csv(tmp_path, _rows(labels)))


def test_swapped_columns_are_refused(tmp_path: Path) -> None:
    body = "label,text\n" + "".join(f"review {i},{i % 2}\n" for i in range(30))
    with pytest.raises(DataError, match=r"looks like texts or ids.*e\.g\. 'review 0'"):
        load_task("csv", train_file=_csv(tmp_path, body))


def test_class_only_in_the_test_file_is_refused_unless_pinned(tmp_path: Path) -> None:
    train = _csv(tmp_path, _rows(["neg", "pos"] * 3))
    test = _csv(tmp_path, _rows(["pos", "neutral", "neg"]), "test.csv")
    with pytest.raises(DataError, match=r"test\.csv column 'label' has label\(s\) that never "
                                        r"occur in .*train\.csv: 'neutral' \(row 1\); .*"
                                        r"--label-names"):
        load_task("csv", train_file=train, test_file=test)
    task = load_task("csv", train_file=train, test_file=test,
                     label_names=["neg", "neutral", "pos"])
    assert task.label_names == ("neg", "neutral", "pos") and task.num_classes == 3
    assert task.test.labels.tolist() == [2, 1, 0]
    ints = _csv(tmp_path, _rows([0, 2, 1]), "test_int.csv")
    with pytest.raises(DataError, match=r"2 \(row 1\); .*--num-labels"):
        load_task("csv", train_file=_csv(tmp_path, _rows([0, 1] * 3)), test_file=ints)


def test_pinned_classes(tmp_path: Path) -> None:
    gaps = _csv(tmp_path, _rows([0, 3, 0, 3]))
    test = _csv(tmp_path, _rows([3, 0]), "test.csv")
    task = load_task("csv", train_file=gaps, test_file=test, num_classes=5)
    assert task.num_classes == 5 and task.train.labels.tolist() == [0, 3, 0, 3]
    assert task.info["label_summary"].endswith("5 classes: 0 (2 rows), 1 (0 rows), 2 (0 rows), "
                                               "3 (2 rows), 4 (0 rows)")
    one_based = _csv(tmp_path, _rows([1, 2, 3] * 2), "one_based.csv")
    test_1 = _csv(tmp_path, _rows([3, 1]), "test_1.csv")
    task = load_task("csv", train_file=one_based, test_file=test_1, label_names=["1", "2", "3"])
    assert task.train.labels.tolist() == [0, 1, 2] * 2 and task.test.labels.tolist() == [2, 0]
    named = load_task("csv", train_file=_csv(tmp_path, _rows([1, 0]), "idx.csv"),
                      test_file=_csv(tmp_path, _rows([0, 1]), "t.csv"),
                      label_names=["neg", "pos"])
    assert named.label_names == ("neg", "pos") and named.train.labels.tolist() == [1, 0]
    assert "0='neg' (1 row), 1='pos' (1 row)" in named.info["label_summary"]
    with pytest.raises(DataError, match=r"label\(s\) outside 0\.\.2 \(--num-labels 3\): 3 "):
        load_task("csv", train_file=gaps, num_classes=3)
    with pytest.raises(DataError, match=r"neither one of --label-names \['neg', 'pos'\] nor an "
                                        r"index 0\.\.1: 3 \(rows 1, 3\)"):
        load_task("csv", train_file=gaps, label_names=["neg", "pos"])
    with pytest.raises(DataError, match="label_names must be 2 or more distinct names"):
        load_task("csv", train_file=gaps, label_names=["a", "a"])


def test_unknown_task_lists_valid() -> None:
    with pytest.raises(DataError, match=r"unknown task 'imbd'; valid tasks: 20news, ag_news, .*"):
        load_task("imbd")


def test_unknown_task_option() -> None:
    with pytest.raises(DataError, match="task 'synthetic'.*unexpected keyword.*colour"):
        load_task("synthetic", colour="red")


def test_unknown_partitioner_lists_valid() -> None:
    with pytest.raises(DataError, match=r"unknown partitioner 'diriclet'; valid: dirichlet, iid"):
        make_partitioner("diriclet", alpha=1.0)


@pytest.mark.parametrize(
    "name,params,pattern",
    [
        ("dirichlet", {"alpha": 0.0}, r"invalid alpha=0\.0"),
        ("dirichlet", {"alpha": -1.0}, r"invalid alpha=-1\.0"),
        ("dirichlet", {}, r"missing \['alpha'\]"),
        ("majority", {"p": 1.5}, r"invalid p=1\.5"),
        ("majority", {"p": -0.1}, r"invalid p=-0\.1"),
        ("majority", {"p": 0.5, "k": 0}, r"invalid k=0"),
        ("quantity_skew", {"beta": 0}, r"invalid beta=0"),
        ("dirichlet", {"alpha": float("inf")}, r"invalid alpha=inf; it must be a finite number"),
        ("quantity_skew", {"beta": float("nan")}, r"invalid beta=nan; it must be a finite"),
        ("iid", {"alpha": 1.0}, r"unknown \['alpha'\]"),
    ],
)
def test_invalid_partitioner_params(name: str, params: dict, pattern: str) -> None:
    with pytest.raises(DataError, match=pattern):
        make_partitioner(name, **params)


def test_invalid_params_in_direct_calls() -> None:
    y = np.repeat(np.arange(3), 10)
    with pytest.raises(DataError, match=r"k must be in \[1, num_classes - 1\] = \[1, 2\], got 3"):
        majority(y, 3, p=0.5, k=3)
    with pytest.raises(DataError, match=r"p must be in \[0, 1\], got 2"):
        majority(y, 3, p=2, k=1)
    with pytest.raises(DataError, match="not enough examples of class"):
        majority(y, 4, p=1.0, k=1, client_size=6)  # 4th client reuses a class: 12 > 10
    with pytest.raises(DataError, match=r"val_fraction \+ test_fraction must be < 1"):
        split_clients([np.arange(5)], 0.5, 0.5)
    with pytest.raises(DataError, match=r"alpha must be a finite number > 0, got inf"):
        dirichlet(y, 3, alpha=float("inf"))
    with pytest.raises(DataError, match=r"partition 'natural' needs per-example groups"):
        natural(y, 3, groups=None)


def test_fewer_examples_than_clients() -> None:
    with pytest.raises(DataError, match=r"fewer examples \(5\) than clients \(8\)"):
        iid(np.zeros(5, np.int32), 8)
    with pytest.raises(DataError, match=r"fewer examples \(5\) than clients \(8\)"):
        make_partitioner("dirichlet", alpha=1.0)(np.zeros(5, np.int32), 8, 0)


def test_client_left_with_zero_examples() -> None:
    with pytest.raises(DataError, match="client 1 was left with zero examples"):
        validate_partition([np.arange(3), np.array([], np.int64)], 3)
    with pytest.raises(DataError, match="client 0 was left with zero training examples"):
        split_clients([np.arange(2), np.arange(2, 12)], 0.5, 0.4)
    feats = {"label": np.zeros(4, np.int32)}
    with pytest.raises(DataError, match="client 1 has zero examples"):
        pack_clients(
            feats, [np.arange(4), np.array([], np.int64)], batch_size=2, seed=0, round_idx=0,
            num_epochs=1,
        )  # fmt: skip


def test_partition_overlap_detected() -> None:
    with pytest.raises(DataError, match="example in two clients"):
        validate_partition([np.arange(3), np.arange(2, 5)], 5)


def test_bad_pack_parameters() -> None:
    feats = {"label": np.zeros(10, np.int32)}
    part = [np.arange(5), np.arange(5, 10)]
    kw = dict(seed=0, round_idx=0)
    with pytest.raises(DataError, match="exactly one of num_epochs"):
        pack_clients(feats, part, batch_size=2, num_epochs=1, num_steps=2, **kw)
    with pytest.raises(DataError, match="batch_size must be >= 1, got 0"):
        pack_clients(feats, part, batch_size=0, num_epochs=1, **kw)
    with pytest.raises(DataError, match=r"client 0 has 5 examples < batch_size 8"):
        pack_clients(feats, part, batch_size=8, num_epochs=1, drop_last=True, **kw)
    with pytest.raises(DataError, match=r"client ids must be in \[0, 2\)"):
        pack_clients(feats, part, batch_size=2, num_epochs=1, client_ids=[2], **kw)
    with pytest.raises(DataError, match="pad_steps_to=1 < the 3 steps"):
        pack_clients(feats, part, batch_size=2, num_epochs=1, pad_steps_to=1, **kw)


def test_bad_task_options(shared_data: Path, cache_dir: Path) -> None:
    with pytest.raises(DataError, match="per_class must be positive, got 0"):
        load_task("cifar10", shared_data, cache_dir=cache_dir, per_class=0)
    with pytest.raises(DataError, match=r"label_noise must be in \[0, 1\), got 1\.5"):
        load_task("synthetic", label_noise=1.5)
    with pytest.raises(DataError, match="task 'csv' needs train_file"):
        load_task("csv")


def test_numbers_in_one_file_and_names_in_the_other_name_both_files(tmp_path: Path) -> None:
    """Each file is consistent; the mix is between them, and the message says so."""
    train = _csv(tmp_path, _rows(["neg", "pos"] * 10))
    test = _csv(tmp_path, _rows([0, 1, 1]), "test.csv")
    with pytest.raises(DataError) as err:
        load_task("csv", train_file=train, test_file=test)
    assert str(err.value) == (
        f"{test} column 'label' holds numbers (0 (row 0), 1 (rows 1, 2)) where {train} holds "
        "names; make every label a number or every label a name, or pin the classes with "
        "--label-names")


def test_a_failing_hub_load_is_one_note_and_one_error(monkeypatch, caplog) -> None:
    """The hub client's warning per retry is silenced (the DataError says why), its logger's
    level restored after; one note says that the hub is being tried."""
    import logging

    import datasets

    from fedjax_lm.data import sources

    def offline_hub(*args, **kwargs):
        for attempt in range(5):
            logging.getLogger("huggingface_hub.utils._http").warning(f"Retrying [{attempt}/5]")
        raise ConnectionError("Name or service not known")

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(datasets, "load_dataset", offline_hub)
    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    with caplog.at_level(logging.WARNING), pytest.raises(DataError) as err:
        sources.load_hub("sst2", "glue", ["sst2/train.tsv"], config="sst2")
    assert str(err.value).endswith("(hub error: ConnectionError: Name or service not known)")
    assert [r.getMessage() for r in caplog.records] == [
        "task sst2: no local files; loading 'glue' from the Hugging Face hub (offline, this "
        "fails after the hub client's retries, ~30 s)"]
    assert hub_log.level == level
