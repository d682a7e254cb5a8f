"""Population runs: prefetched rounds equal unprefetched ones bit for bit, per-client accuracy
percentiles equal numpy's, and a population larger than the test set trains and evaluates."""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from fedjax_lm.data import ClientIndex, iid
from fedjax_lm.data.task_data import Split, TaskData
from fedjax_lm.grid import ConfigError
from fedjax_lm.io import read_jsonl
from fedjax_lm.runner import RunConfig, train
from fedjax_lm.runner.checks import from_dict
from fedjax_lm.runner.digest import params_digest, partition_digest
from fedjax_lm.runner.evaluation import (
    CLIENT_ACCURACY_FILE,
    eval_sample,
    percentile_fields,
    population_eval,
)
from fedjax_lm.runner.experiment import _partition
from fedjax_lm.runner.prefetch import RoundFeeder
from fedjax_lm.runner.report import write_report

pytestmark = pytest.mark.usefixtures("shared_compiles")

# 60 training + 10 held-out clients of ~1 example each; the test set (48) is smaller than the
# population, as SST-2's 872 test examples are for 20,000 clients.
POPULATION = dict(task="synthetic", model="preset:tiny", max_train_examples=96,
                  max_test_examples=48, max_length=16, batch_size=8, local_epochs=None,
                  local_steps=2, lr=0.05, clients=60, cohort_size=10, holdout_clients=10,
                  eval_clients=5, rounds=3)


@pytest.mark.slow
def test_prefetched_population_run_is_bitwise_the_unprefetched_one(tmp_path, capsys):
    runs = {}
    for prefetch in (True, False):
        cfg = RunConfig(**POPULATION, prefetch=prefetch, out=str(tmp_path / f"p{prefetch}"))
        runs[prefetch] = (train(cfg, progress=False), read_jsonl(Path(cfg.out) / "metrics.jsonl"))
    assert "smaller than the population (60 clients)" in capsys.readouterr().out
    (fa, ma), (fb, mb) = runs[True], runs[False]
    assert fa["params_sha256"] == fb["params_sha256"]
    timing = {"wall_s", "host_wait_s"}
    assert [{k: v for k, v in r.items() if k not in timing} for r in ma] == [
        {k: v for k, v in r.items() if k not in timing} for r in mb]
    for record in ma:
        assert record["host_wait_s"] >= 0 and "client_accuracy_min" not in record
        assert record["train_clients_evaluated"] == record["heldout_clients_evaluated"] == 5
        assert record["heldout_client_accuracy_worst"] <= record["heldout_client_accuracy_p50"]
    saved = json.loads((tmp_path / "pTrue" / CLIENT_ACCURACY_FILE).read_text())
    assert saved["round"] == 3 and len(saved["train"]) == len(saved["heldout"]) == 5
    assert percentile_fields("train", np.array(saved["train"]))["train_client_accuracy_p50"] \
        == ma[-1]["train_client_accuracy_p50"]
    summary = write_report(tmp_path).read_text()  # the distribution plot, and its table
    assert (tmp_path / "client_accuracy.png").stat().st_size > 0
    row = next(line for line in summary.splitlines() if line.startswith("| pTrue |"))
    assert f"{ma[-1]['heldout_client_accuracy_p50']:.3f}" in row


def test_percentile_fields_are_numpys():
    acc = np.random.default_rng(0).random(37)
    fields = percentile_fields("heldout", acc)
    p10, p50, p90 = np.percentile(acc, [10, 50, 90])
    assert fields == {"heldout_client_accuracy_p10": p10, "heldout_client_accuracy_p50": p50,
                      "heldout_client_accuracy_p90": p90,
                      "heldout_client_accuracy_worst": acc.min(),
                      "heldout_client_accuracy_mean": acc.mean()}


def test_population_eval_scores_each_sampled_client_on_its_own_data():
    """With a predictor that is right exactly on even labels, each client's accuracy is the
    share of even labels among its examples."""
    labels = np.random.default_rng(3).integers(0, 4, 500).astype(np.int32)
    features = {"label": labels}
    index = iid(labels, 50, 0)

    def predict(params, batch):
        return (batch["label"] % 2 == 0).astype(np.float32), np.zeros(batch["label"].shape)

    fields, per_client = population_eval(predict, None, features,
                                         {"train": index, "heldout": None}, 7, 0, 4, 16)
    ids = eval_sample(50, 7, 0, 4)
    expected = np.array([(labels[index[c]] % 2 == 0).mean() for c in ids])
    assert np.array_equal(per_client["train"], expected) and "heldout" not in per_client
    assert fields == {**percentile_fields("train", expected), "train_clients_evaluated": 7}
    assert not np.array_equal(eval_sample(50, 7, 0, 5), ids)  # a new sample each round
    assert np.array_equal(eval_sample(50, 7, 0, 4), ids)  # the same on a resume


def test_round_feeder_makes_every_round_once_in_order():
    made = []

    def make(r):
        made.append(r)
        time.sleep(0.01)
        return r * r

    for ahead in (True, False):
        made.clear()
        with RoundFeeder(make, ahead=ahead) as feeder:
            out = [(r, item) for r, item, wait in feeder.rounds(2, 6)]
        assert out == [(r, r * r) for r in range(2, 6)] and made == [2, 3, 4, 5]


def test_partition_digest_is_the_digest_runs_recorded_before():
    """Resume fingerprints: the flat index hashes like the list of arrays it replaced."""
    labels = np.arange(230) % 3
    train, shards = iid(labels, 12, 0), iid(np.arange(60), 12, 1)
    assert partition_digest(train, shards) == params_digest([list(train), list(shards)])
    assert partition_digest(train, ClientIndex(np.zeros(0, np.int64), np.zeros(1, np.int64))) \
        == params_digest([list(train), []])
    big = np.arange(3 * 2**22, dtype=np.int32).reshape(-1, 4)  # hashed in chunks
    h = __import__("hashlib").sha256()
    h.update(jax.tree_util.keystr(()).encode())
    h.update(big.tobytes())
    assert params_digest(big) == h.hexdigest()


def _authors_task(labels: np.ndarray) -> TaskData:
    """Blog-like data: 30 posts by 6 authors (5 each), with the given class per post."""
    split = Split(labels=labels, texts=["a post"] * 30, groups=np.repeat(np.arange(6), 5))
    return TaskData("blog10", split, split, num_classes=int(labels.max()) + 1,
                    label_names=tuple("abcdef"[:int(labels.max()) + 1]))


def test_held_out_clients_whose_classes_no_training_client_has_are_refused():
    """Natural partition where each author is a class: a held-out author's accuracy is 0 by
    construction, so holding authors out measures nothing."""
    task = _authors_task(np.repeat(np.arange(6), 5))  # each author is a class
    cfg = from_dict({"task": "blog10", "partition": "natural", "clients": 4,
                     "holdout_clients": 2, "eval_clients": 1})
    with pytest.raises(ConfigError) as err:
        _partition(cfg, task)
    assert str(err.value) == (
        "2 of the 2 held-out clients hold only classes no training client has (partition "
        "natural), so their accuracy is 0 by construction; drop --holdout-clients or use "
        "another partition")
    training, heldout = _partition(cfg, _authors_task(np.arange(30) % 6))  # authors write all
    assert (len(training), len(heldout)) == (4, 2)


def test_natural_partition_with_another_client_count_names_the_authors():
    task = _authors_task(np.arange(30) % 3)
    cfg = from_dict({"task": "blog10", "partition": "natural", "clients": 10,
                     "max_train_examples": 30})
    with pytest.raises(ConfigError) as err:
        _partition(cfg, task)
    assert str(err.value) == (
        "partition natural makes one client per author: the 30 training examples (a "
        "--max-train-examples 30 subsample: a larger one may keep more authors) hold 6 "
        "authors, not 10 clients; set --clients 6")
    training, _ = _partition(cfg.replace(clients=6), task)
    assert len(training) == 6
