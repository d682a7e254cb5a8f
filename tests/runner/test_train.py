"""The training loop on a tiny encoder: outputs, resume, faults, sweeps and reports."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedjax_lm.io import read_jsonl
from fedjax_lm.runner import RunConfig, TrainingError, train
from fedjax_lm.runner.report import write_report
from fedjax_lm.runner.sweep import run_sweep

pytestmark = pytest.mark.usefixtures("shared_compiles")

TINY = dict(task="synthetic", model="preset:tiny", max_train_examples=96, max_test_examples=48,
            max_length=16, batch_size=8, local_epochs=1, lr=0.05, clients=3, rounds=3)


def tiny(tmp_path, **kw) -> RunConfig:
    return RunConfig(**{**TINY, "out": str(tmp_path / "run"), **kw})


def test_run_writes_config_metrics_tensorboard_and_final(tmp_path):
    cfg = tiny(tmp_path, eval_every=2)
    final = train(cfg, progress=False)
    run = Path(cfg.out)
    assert (run / "config.yaml").exists() and list((run / "tb").iterdir())
    records = read_jsonl(run / "metrics.jsonl")
    assert [r["round"] for r in records] == [1, 2, 3]
    assert "eval_accuracy" not in records[0] and "eval_accuracy" in records[1]  # every 2 + last
    for key in ("train_loss", "update_norm", "wall_s", "skipped_clients", "cohort_size"):
        assert key in records[0]
    for key in ("eval_loss", "client_accuracy_min", "client_accuracy_mean", "client_accuracy_max"):
        assert key in records[2]
    assert records[2]["client_accuracy_min"] <= records[2]["eval_accuracy"] <= records[2][
        "client_accuracy_max"]
    assert final["final_accuracy"] == records[2]["eval_accuracy"]
    assert final["train_examples"] == 96 and final["num_clients"] == 3
    # 96 examples over 3 clients = 32 each = 4 batches of 8.
    assert final["steps_per_round"] == 4
    assert json.loads((run / "final.json").read_text())["params_sha256"] == final["params_sha256"]
    assert final["warnings"] == []  # a healthy run raises no divergence warning


def test_partial_participation_trains_the_cohort_only(tmp_path):
    final = train(tiny(tmp_path, clients=4, cohort_size=2, max_train_examples=128),
                  progress=False)
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["cohort_size"] for r in records] == [2, 2, 2]
    assert final["rounds"] == 3


@pytest.mark.slow
def test_chunk_executors_train_the_same_model(tmp_path):
    from fedjax_lm.runner.experiment import build_engine, build_experiment

    runs = {}
    for executor in ("scan", "host"):
        cfg = tiny(tmp_path / executor, rounds=1, clients_per_chunk=2, chunk_executor=executor)
        assert build_engine(cfg, build_experiment(cfg)).config.chunk_executor == executor
        train(cfg, progress=False)
        runs[executor] = read_jsonl(Path(cfg.out) / "metrics.jsonl")
    scan, host = runs["scan"][0], runs["host"][0]
    assert scan["train_loss"] == pytest.approx(host["train_loss"], rel=1e-5)
    assert scan["eval_loss"] == pytest.approx(host["eval_loss"], rel=1e-4)


def test_finished_run_is_not_rerun_and_config_mismatch_is_refused(tmp_path):
    cfg = tiny(tmp_path, rounds=1)
    first = train(cfg, progress=False)
    assert train(cfg, progress=False) == first
    with pytest.raises(ValueError,
                       match=r"holds a run from a different config \(lr: 0.05 -> 0.5\)"):
        train(cfg.replace(lr=0.5), progress=False)


@pytest.mark.slow
def test_non_finite_update_fails_clearly_and_a_fully_skipped_round_is_an_error(tmp_path):
    """No round of data reached the model: neither policy reports a loss for it."""
    run = tmp_path / "run"
    with pytest.raises(TrainingError) as err:
        train(tiny(tmp_path, lr=1e30, rounds=2), progress=False)
    assert str(err.value) == (
        "round 1: client(s) [0, 1, 2] produced a non-finite update (NaN/Inf); stopping. No round "
        f"was checkpointed, so {run} can be reused: rerun with a lower lr (now 1e+30).")
    with pytest.raises(TrainingError) as err:
        train(tiny(tmp_path, lr=1e30, rounds=2, nonfinite="skip"), progress=False)
    assert str(err.value) == (
        "round 1: every client of the round ([0, 1, 2]) produced a non-finite update (NaN/Inf), "
        "so nothing was trained and there is no loss to report; stopping. No round was "
        f"checkpointed, so {run} can be reused: rerun with a lower lr (now 1e+30).")
    assert read_jsonl(run / "metrics.jsonl") == [] and not (run / "final.json").exists()
    # The advice works: the corrected command reuses the same --out.
    final = train(tiny(tmp_path, rounds=2, nonfinite="skip"), progress=False)
    assert final["rounds"] == 2 and final["skipped_client_updates"] == 0


def _cli_args(out: Path, rounds: int) -> list[str]:
    args = ["train", "--no-progress", "--out", str(out), "--rounds", str(rounds),
            "--client-optimizer", "adam", "--lr", "0.01", "--carry-client-state", "true",
            "--cohort-size", "2"]
    for key, value in TINY.items():
        if key not in ("rounds", "lr"):
            args += [f"--{key.replace('_', '-')}", str(value)]
    return args


def test_killed_and_resumed_run_is_bitwise_identical(tmp_path):
    """SIGKILL mid-run (a real process), rerun the same command: same final params bit for bit
    as a run never killed (the reference and the rerun run in-process)."""
    from fedjax_lm.cli import main

    rounds = 8
    # The reference never resumes: no checkpoints (an execution field; the model is the same)
    assert main([*_cli_args(tmp_path / "ref", rounds), "--checkpoint-every", "0"]) == 0
    victim = subprocess.Popen([sys.executable, "-m", "fedjax_lm.cli",
                               *_cli_args(tmp_path / "killed", rounds)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              start_new_session=True)
    metrics = tmp_path / "killed" / "metrics.jsonl"
    try:
        deadline = time.time() + 240
        while time.time() < deadline and len(read_jsonl(metrics)) < 3:
            time.sleep(0.02)
        assert len(read_jsonl(metrics)) >= 3, "the run never reached round 3"
        os.killpg(victim.pid, signal.SIGKILL)
        victim.wait(timeout=30)
    finally:
        if victim.poll() is None:
            os.killpg(victim.pid, signal.SIGKILL)
    assert not (tmp_path / "killed" / "final.json").exists()

    assert main(_cli_args(tmp_path / "killed", rounds)) == 0
    a = json.loads((tmp_path / "ref" / "final.json").read_text())
    b = json.loads((tmp_path / "killed" / "final.json").read_text())
    assert a["params_sha256"] == b["params_sha256"]
    assert [r["round"] for r in read_jsonl(metrics)] == list(range(1, rounds + 1))
    keys = ("train_loss", "eval_accuracy", "update_norm")
    assert [[r[k] for k in keys] for r in read_jsonl(metrics)] == [
        [r[k] for k in keys] for r in read_jsonl(tmp_path / "ref" / "metrics.jsonl")]


def test_sweep_skips_finished_cells_and_reports(tmp_path):
    from fedjax_lm.runner.presets import Preset

    preset = Preset(name="t", base={**TINY, "rounds": 2}, grid={"clients": [1, 2]})
    run_sweep(preset, {}, tmp_path, progress=False)
    finals = sorted(tmp_path.glob("*/final.json"))
    assert [p.parent.name for p in finals] == ["clients=1", "clients=2"]
    mtimes = [p.stat().st_mtime_ns for p in finals]
    first = (tmp_path / "summary.md").read_text()
    assert "Wall time of the last sweep invocation" in first
    run_sweep(preset, {}, tmp_path, progress=False)  # everything finished: nothing reruns
    assert [p.stat().st_mtime_ns for p in finals] == mtimes
    assert (tmp_path / "summary.md").read_text() == first  # still the timing of the real work

    rows = (tmp_path / "results.csv").read_text().strip().splitlines()
    assert len(rows) == 3 and rows[0].startswith("model,task,clients,seed,final_accuracy")
    table = list(csv.DictReader(rows))  # each run's communication, as its final.json says
    assert [float(r["upload_bytes_per_client"]) for r in table] == [
        json.loads(p.read_text())["upload_bytes_per_client"] for p in finals]
    summary = (tmp_path / "summary.md").read_text()
    assert "| preset:tiny | synthetic | 1 | 1 |" in summary
    assert "| preset:tiny | synthetic | 2 | 1 |" in summary
    for png in ("accuracy_vs_round.png", "final_accuracy_vs_clients.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no finished runs"):
        write_report(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match=r"nosuch does not exist; name a sweep's or a "
                                                r"run's folder$"):
        write_report(tmp_path / "nosuch")


def test_per_client_heads_reproduce_paper_one_round_one(tmp_path):
    """head_init=per_client: round 1 starts each client from its own random head."""
    import dataclasses

    import jax

    from fedjax_lm.runner.experiment import build_experiment, per_client_heads

    cfg = tiny(tmp_path, clients=1, rounds=1, head_init="per_client")
    exp = build_experiment(cfg)
    per_client = train(cfg, progress=False, exp=exp)
    # One client: identical to a shared-head run whose server head is client 0's head
    # (compiled, as the round's client-init hook draws it).
    head = jax.jit(per_client_heads(exp.model, cfg.seed))(exp.params, 0)
    ref = train(cfg.replace(head_init="shared", out=str(tmp_path / "ref")), progress=False,
                exp=dataclasses.replace(exp, params=head))
    assert per_client["params_sha256"] == ref["params_sha256"]
    shared = train(cfg.replace(head_init="shared", out=str(tmp_path / "shared")),
                   progress=False, exp=exp)
    assert shared["params_sha256"] != per_client["params_sha256"]
    with pytest.raises(ValueError, match="head_init=per_client reproduces paper 1's code"):
        train(cfg.replace(server_optimizer="fedadam"), progress=False)  # checked on entry


@pytest.mark.slow
def test_scaffold_from_the_cli_resumes_bitwise_with_its_client_state(tmp_path):
    """`--algorithm scaffold` with partial participation: its control variates live in the
    client-state store, are checkpointed, and a resumed run ends bitwise identical."""
    from fedjax_lm.cli import main

    flags = ["--algorithm", "scaffold", "--clients", "4", "--cohort-size", "2",
             "--partition", "dirichlet", "--alpha", "0.1", "--no-progress"]
    for name, rounds in (("straight", 4), ("resumed", 2), ("resumed", 4)):
        args = ["train", *flags,
                *[f"--{k.replace('_', '-')}={v}" for k, v in TINY.items() if k != "clients"],
                "--rounds", str(rounds), "--out", str(tmp_path / name),
                "--checkpoint-every", "0" if name == "straight" else "1"]  # straight: no resume
        assert main(args) == 0
    a = json.loads((tmp_path / "straight" / "final.json").read_text())
    b = json.loads((tmp_path / "resumed" / "final.json").read_text())
    assert a["config"]["algorithm"] == "scaffold" and a["client_state_sha256"]
    assert (a["params_sha256"], a["client_state_sha256"]) == (b["params_sha256"],
                                                               b["client_state_sha256"])
    assert [r["round"] for r in read_jsonl(tmp_path / "resumed" / "metrics.jsonl")] == [1, 2, 3, 4]
