"""Runs that must not end with a wrong result: non-finite server states, divergence, two
writers on one --out, setup failures, changed data and fewer rounds on resume. Each asserts the
exact message and that the command the message advises then works."""

import dataclasses
import importlib
import os
import re
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from fedjax_lm import federated as fl
from fedjax_lm.grid import ConfigError, ResumeError
from fedjax_lm.io import read_jsonl
from fedjax_lm.runner import TrainingError, train
from fedjax_lm.runner.experiment import build_algorithm, build_experiment, executor
from fedjax_lm.runner.rundir import RunDirInUse, checkpointed_round, locked
from fedjax_lm.runner.train import divergence_warning, nonfinite_server_parts
from tests.runner.test_train import TINY, tiny

train_module = importlib.import_module("fedjax_lm.runner.train")


def cli_train(out, *flags) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "fedjax_lm.cli", "train", "--no-progress", "--out", str(out),
            *[f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()], *flags]
    return subprocess.run(args, capture_output=True, text=True, timeout=300)


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The CLI's one error line (exit 2, no traceback)."""
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("fedjax-lm train:")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def poison_server(monkeypatch, part: str, from_round: int) -> None:
    """From round `from_round` on, the server update writes NaN into `part` of its state."""

    def poison(tree, bad):
        return jax.tree.map(
            lambda x: jnp.where(bad, jnp.nan, x) if jnp.issubdtype(x.dtype, jnp.floating) else x,
            tree)

    def build_engine(cfg, exp):
        algorithm = build_algorithm(cfg, exp)

        def server_update(state, aggregate):
            new = algorithm.server_update(state, aggregate)
            bad = state.round + 1 >= from_round
            return new.replace(**{part: poison(getattr(new, part), bad)})

        return fl.FederatedEngine(dataclasses.replace(algorithm, server_update=server_update),
                                  executor(cfg), weighting=cfg.weighting)

    monkeypatch.setattr(train_module, "build_engine", build_engine)


@pytest.mark.parametrize("part, policy, named", [
    ("params", "fail", "params and step norm"),
    ("opt_state", "skip", "optimizer state"),
])
def test_non_finite_server_state_stops_before_it_is_checkpointed(tmp_path, monkeypatch, part,
                                                                 policy, named):
    run = tmp_path / "run"
    cfg = tiny(tmp_path, server_optimizer="fedavgm", server_lr=1.0, nonfinite=policy)
    poison_server(monkeypatch, part, from_round=2)
    with pytest.raises(TrainingError) as err:
        train(cfg, progress=False)
    assert str(err.value) == (
        f"round 2: the server update (server_optimizer=fedavgm, server_lr=1) made the server "
        f"{named} non-finite (NaN/Inf) from finite client updates; stopping. The last good "
        "checkpoint is round 1 (kept). Rerun with a lower server_lr (now 1) or a lower lr (now "
        f"0.05) in a new --out ({run} resumes only its own config), or delete {run} to start "
        "over.")
    assert checkpointed_round(run) == 1 and not (run / "final.json").exists()
    assert [r["round"] for r in read_jsonl(run / "metrics.jsonl")] == [1]
    monkeypatch.undo()
    if policy == "skip":
        return
    # The advice is true: the same --out refuses a changed config, a new --out takes it.
    with pytest.raises(ResumeError, match=r"holds a run from a different config \(server_lr: "
                                          r"1.0 -> 0.5\)"):
        train(cfg.replace(server_lr=0.5), progress=False)
    final = train(cfg.replace(server_lr=0.5, out=str(tmp_path / "new")), progress=False)
    assert final["rounds"] == 3


def test_server_state_finiteness_names_each_part():
    params = {"w": jnp.ones(2)}
    state = fl.ServerState(params, (), jnp.zeros((), jnp.int32), jax.random.key(0))
    assert nonfinite_server_parts(state, 1.0) is None  # an empty optimizer state is finite
    assert nonfinite_server_parts(state, float("inf")) == "step norm"
    bad = state.replace(params={"w": jnp.array([1.0, jnp.inf])}, opt_state={"m": jnp.nan})
    assert nonfinite_server_parts(bad) == "params and optimizer state"


def test_server_step_overflow_fails_in_one_line_and_the_advice_works(tmp_path):
    """A finite but absurd server_lr: the step overflows in round 1; nothing is checkpointed,
    so the corrected command runs in the same --out."""
    out = tmp_path / "run"
    proc = cli_train(out, "--server-optimizer", "fedavgm", "--server-lr", "1e30")
    assert error_line(proc) == (
        "fedjax-lm train: error: round 1: the server update (server_optimizer=fedavgm, "
        "server_lr=1e+30) made the server step norm non-finite (NaN/Inf) from finite client "
        f"updates; stopping. No round was checkpointed, so {out} can be reused: rerun with a "
        "lower server_lr (now 1e+30) or a lower lr (now 0.05).")
    assert checkpointed_round(out) is None and not (out / "final.json").exists()
    proc = cli_train(out, "--server-optimizer", "fedavgm", "--server-lr", "1", "--rounds", "1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert yaml.safe_load((out / "config.yaml").read_text())["server_lr"] == 1.0


def test_exploding_loss_warns_once_without_failing(tmp_path, capsys):
    final = train(tiny(tmp_path, lr=1e6, rounds=2), progress=False)
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and final["warnings"] == warnings
    assert re.fullmatch(
        r"warning: round 1 train loss \S+ is \d+x a uniform guess's \(ln 4 = 1.39\): the run is "
        r"diverging; try a lower lr \(now 1e\+06\) or server_lr \(now 1\)", warnings[0])
    assert final["rounds"] == 2  # warned, not stopped
    cfg = tiny(tmp_path)
    assert divergence_warning(cfg, 5, 0.5, 0.004, 2) == (
        "warning: round 5 train loss 0.5 is 125x round 1's (0.004): the run is diverging; try a "
        "lower lr (now 0.05) or server_lr (now 1)")
    assert divergence_warning(cfg, 5, 1.2, 1.4, 4) is None


def test_a_second_writer_on_the_same_out_fails_at_once_naming_the_holder(tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import os, sys; from pathlib import Path; "
         "from fedjax_lm.runner.rundir import locked\n"
         f"with locked(Path({str(out)!r})):\n    print(os.getpid(), flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        pid = int(holder.stdout.readline())
        proc = cli_train(out)
        assert error_line(proc) == (
            f"fedjax-lm train: error: {out} is in use by another run (pid {pid} on "
            f"{socket.gethostname()}); wait for it to finish, or use another --out")
        assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing else was touched
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert train(tiny(tmp_path, rounds=1), progress=False)["rounds"] == 1  # lock released
    with locked(out), pytest.raises(RunDirInUse, match=f"pid {os.getpid()} on "):
        train(tiny(tmp_path, rounds=1), progress=False)  # even from the same process


def test_a_failed_setup_leaves_nothing_that_refuses_the_corrected_command(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"the test set \(2 examples\) is smaller than the "
                                          r"number of clients \(3\)"):
        train(tiny(tmp_path, max_test_examples=2), progress=False)
    assert not (out / "config.yaml").exists()
    # A leftover config.yaml with no checkpoint (an older version's failed setup) binds nothing.
    (out / "config.yaml").write_text(yaml.safe_dump(tiny(tmp_path, lr=0.5).to_dict()))
    assert train(tiny(tmp_path, rounds=1), progress=False)["rounds"] == 1
    assert yaml.safe_load((out / "config.yaml").read_text())["lr"] == 0.05


def test_resume_refuses_other_data_naming_what_changed(tmp_path):
    import json

    cfg = tiny(tmp_path, rounds=1)
    exp = build_experiment(cfg)
    train(cfg, progress=False, exp=exp)
    old = json.loads((tmp_path / "run" / "data.json").read_text())
    labels = (exp.train["label"] + 1) % exp.num_classes  # the same files, relabelled
    other = dataclasses.replace(exp, train={**exp.train, "label": labels},
                                partition=exp.partition[::-1])
    new = train_module.data_fingerprint(other)
    with pytest.raises(ResumeError) as err:
        train(cfg.replace(rounds=2), progress=False, exp=other)
    run = tmp_path / "run"
    assert str(err.value) == (
        f"{run} holds 1 round(s) trained on other data (train_sha256: "
        f"{old['train_sha256'][:12]}… -> {new['train_sha256'][:12]}…; partition_sha256: "
        f"{old['partition_sha256'][:12]}… -> {new['partition_sha256'][:12]}…): the data "
        "directory, data files or tokenizer changed since. Resume with the original data, or "
        "use another --out.")
    assert train(cfg.replace(rounds=2), progress=False, exp=exp)["rounds"] == 2  # same data


def test_fewer_rounds_never_relabel_a_finished_run(tmp_path):
    out = tmp_path / "run"
    final = train(tiny(tmp_path, rounds=2), progress=False)
    before = {name: (out / name).read_bytes() for name in ("final.json", "config.yaml")}
    proc = cli_train(out, "--rounds", "1")
    assert error_line(proc) == (
        f"fedjax-lm train: error: {out} holds a run trained for 2 rounds: --rounds 1 cannot undo "
        "rounds (its parameters are the round-2 model). Rerun with --rounds 2 or more, or use "
        "another --out.")
    assert {name: (out / name).read_bytes() for name in before} == before
    assert train(tiny(tmp_path, rounds=2), progress=False) == final  # the corrected command


def test_a_killed_extension_does_not_leave_a_stale_final(tmp_path, monkeypatch):
    """Extending a finished run: once training continues, final.json no longer describes the
    directory, so a failure mid-extension must not leave the old one behind."""
    out = tmp_path / "run"
    train(tiny(tmp_path, rounds=1), progress=False)
    poison_server(monkeypatch, "params", from_round=3)
    with pytest.raises(TrainingError, match="round 3: the server update"):
        train(tiny(tmp_path, rounds=3), progress=False)
    assert not (out / "final.json").exists() and checkpointed_round(out) == 2
    monkeypatch.undo()
    assert np.isfinite(train(tiny(tmp_path, rounds=3), progress=False)["final_train_loss"])


def test_a_non_finite_checkpoint_from_an_older_version_is_refused_on_resume(tmp_path):
    from fedjax_lm.runner.checkpoint import Checkpointer
    from fedjax_lm.runner.experiment import build_engine

    cfg = tiny(tmp_path, rounds=1)
    exp = build_experiment(cfg)
    train(cfg, progress=False, exp=exp)
    run = tmp_path / "run"
    ckpt = Checkpointer(run / "checkpoints")
    _, state, _ = ckpt.restore(build_engine(cfg, exp).init(exp.params, jax.random.key(0)))
    ckpt.save(2, state.replace(params=jax.tree.map(lambda x: x * jnp.nan, state.params)))
    ckpt.close()
    with pytest.raises(TrainingError) as err:
        train(cfg.replace(rounds=3), progress=False, exp=exp)
    assert str(err.value) == (
        f"the round-2 checkpoint in {run} holds non-finite server params (saved by a version "
        f"that did not check the server update); delete {run} to start over")


def test_damaged_checkpoint_falls_back_to_the_one_before_and_stays_bitwise(tmp_path, capsys):
    """A truncated newest checkpoint is named, deleted, and the run resumes from the previous
    one: it ends bitwise equal to a run that was never damaged, and reruns keep working."""
    straight = train(tiny(tmp_path, rounds=3, out=str(tmp_path / "straight")), progress=False)
    damaged = tiny(tmp_path, out=str(tmp_path / "damaged"))
    train(damaged.replace(rounds=2), progress=False)
    newest = tmp_path / "damaged" / "checkpoints" / "2"
    files = sorted((p for p in newest.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    for path in files[-3:]:  # the largest files: array data and its metadata
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 3] + b"\0garbage")
    capsys.readouterr()
    resumed = train(damaged, progress=False)
    warning = capsys.readouterr().err
    assert f"warning: checkpoint {newest} is damaged" in warning
    assert "resuming from an earlier one" in warning
    assert resumed["params_sha256"] == straight["params_sha256"]
    rounds = [r["round"] for r in read_jsonl(tmp_path / "damaged" / "metrics.jsonl")]
    assert rounds == [1, 2, 3]
