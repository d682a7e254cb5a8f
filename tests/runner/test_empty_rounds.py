"""Poisson rounds nobody joined: a run in which no round trained fails in one line, one with
some empty rounds warns and keeps its byte counts well-defined (0 in an empty round, JSON-valid);
SCAFFOLD counts its control variate in both directions."""

import json

import jax
import numpy as np
import pytest

from fedjax_lm.io import read_jsonl
from fedjax_lm.runner import TrainingError, train
from fedjax_lm.runner.experiment import build_experiment
from tests.runner.test_train import TINY, tiny

pytestmark = pytest.mark.usefixtures("shared_compiles")

HIDDEN, LAYERS = 64, 2  # preset:tiny
# 6 clients, each joining with p = 1/6: seed 15 draws nobody in rounds 1 and 2, seed 9 draws
# nobody in rounds 1 and 3 and client 5 alone in round 2.
POISSON = dict(clients=6, cohort_size=1, sampling="poisson")
LORA = dict(peft="lora", lora_rank=4, lora_ranks=("2", "4"), lora_targets=("query", "value"))


def _bytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def test_a_run_in_which_no_round_trained_fails_in_one_line(tmp_path):
    cfg = tiny(tmp_path, seed=15, rounds=2, **POISSON)
    with pytest.raises(TrainingError) as e:
        train(cfg, progress=False)
    assert str(e.value) == (
        "no round trained: all 2 rounds drew an empty cohort (sampling=poisson, expected "
        "cohort_size 1 of 6 clients), so the model is the untrained initial one; rerun with a "
        f"larger --cohort-size (now 1) or --sampling fixed, in a new --out or after deleting "
        f"{cfg.out}")
    assert not (tmp_path / "run" / "final.json").exists()
    assert [r["cohort_size"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")] == [0, 0]


def test_the_cli_exits_nonzero_with_one_line(tmp_path, capsys):
    from fedjax_lm.cli import main

    args = ["train", "--no-progress", "--out", str(tmp_path / "run"), "--seed", "15",
            "--clients", "6", "--cohort-size", "1", "--sampling", "poisson",
            *[f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()
              if k not in ("clients", "rounds")], "--rounds", "2"]
    assert main(args) != 0
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and "no round trained: all 2 rounds drew an empty cohort" in errors[0]


def test_some_empty_rounds_warn_and_bytes_stay_finite_under_mixed_lora_ranks(tmp_path, capsys):
    cfg = tiny(tmp_path, seed=9, rounds=3, **POISSON, **LORA)
    final = train(cfg, progress=False)
    run = tmp_path / "run"
    records = read_jsonl(run / "metrics.jsonl")
    assert [r["cohort_size"] for r in records] == [0, 1, 0]
    warning = ("warning: 2 of 3 rounds had no client (sampling=poisson, expected cohort_size 1) "
               "and trained nothing; final_train_loss is from the last round that trained; "
               "raise --cohort-size (now 1) or use --sampling fixed")
    assert final["warnings"] == [warning]
    assert warning in capsys.readouterr().err
    # client 5's rank under round-robin ranks 2,4 over 6 clients is 4: the head plus 4 rank
    # components (an A column and a B row) of query and value in each layer, float32
    exp = build_experiment(cfg)
    assert exp.peft.ranks[5] == 4
    one_client = _bytes(exp.params["head"]) + 4 * LAYERS * 2 * (HIDDEN + HIDDEN) * 4
    for key in ("upload_bytes_per_client", "download_bytes_per_client"):
        assert [r[key] for r in records] == [0, one_client, 0]
        assert final[key] == one_client  # the mean over the rounds that had clients
    text = (run / "final.json").read_text() + (run / "metrics.jsonl").read_text()
    assert "NaN" not in text
    json.loads((run / "final.json").read_text())  # strict JSON
    assert records[1]["train_loss"] is not None
    assert (final["final_train_loss"], final["final_train_loss_round"],
            final["rounds_trained"]) == (records[1]["train_loss"], 2, 1)


def test_client_bytes_of_an_empty_cohort_is_zero(tmp_path):
    exp = build_experiment(tiny(tmp_path, **POISSON, **LORA))
    with np.errstate(all="raise"):
        assert exp.peft.client_bytes(np.zeros(0, np.int64)) == 0.0


def test_scaffold_counts_model_and_control_variate_each_way(tmp_path):
    out = {}
    for algorithm in ("fedavg", "scaffold"):
        cfg = tiny(tmp_path / algorithm, rounds=1, algorithm=algorithm, client_optimizer="sgd")
        out[algorithm] = (train(cfg, progress=False),
                          read_jsonl(tmp_path / algorithm / "run" / "metrics.jsonl")[0])
    model = _bytes(build_experiment(tiny(tmp_path)).params)  # everything trains, float32
    for algorithm, factor in (("fedavg", 1), ("scaffold", 2)):
        final, record = out[algorithm]
        for key in ("upload_bytes_per_client", "download_bytes_per_client"):
            assert record[key] == final[key] == factor * model, (algorithm, key)
