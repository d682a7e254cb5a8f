"""Runs that must not end with a wrong result: non-finite server states, divergence, two
writers on one --out, setup failures, changed data on resume, a non-finite checkpoint. Each
asserts the exact message and that the command the message advises then works. (The CLI cases
of the same classes, with their corrected commands, are rows of tests/test_bad_inputs.py.)

Runs are in-process and share compiled programs (`shared_compiles`); tests that need a trained
run start from a copy of the session's (`copy_trained_run`).
"""

import dataclasses
import importlib
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from fedjax_lm import federated as fl
from fedjax_lm.grid import ConfigError, ResumeError, load_yaml
from fedjax_lm.io import read_jsonl
from fedjax_lm.runner import RunConfig, TrainingError, train
from fedjax_lm.runner.checks import from_dict
from fedjax_lm.runner.experiment import build_algorithm, build_experiment, executor
from fedjax_lm.runner.rundir import RunDirInUse, checkpointed_round, locked
from fedjax_lm.runner.train import divergence_warning, nonfinite_server_parts
from tests.runner.test_train import TINY, tiny

train_module = importlib.import_module("fedjax_lm.runner.train")
pytestmark = pytest.mark.usefixtures("shared_compiles")


def cli_train(out, capfd, *flags) -> tuple[int, str]:
    """`fedjax-lm train` with the TINY config in-process: (exit status, stderr)."""
    from fedjax_lm.cli import main

    code = main(["train", "--no-progress", "--out", str(out),
                 *[f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()], *flags])
    return code, capfd.readouterr().err


def error_line(code: int, err: str) -> str:
    """The CLI's one error line (exit 2, no traceback)."""
    assert code == 2, err[-2000:]
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def trained_config(run: Path) -> RunConfig:
    """The config of a copy of the session's trained run."""
    return from_dict(load_yaml(run / "config.yaml")).replace(out=str(run))


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
    pytest.param("opt_state", "skip", "optimizer state", marks=pytest.mark.slow),
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


def test_a_late_collapse_warns_naming_the_best_round(tmp_path):
    from fedjax_lm.runner.guards import collapse_warning

    cfg = tiny(tmp_path)
    curve = [{"round": r, "eval_accuracy": a, "train_loss": 0.1}
             for r, a in [(2, 0.60), (4, 0.72), (6, 0.70), (8, 0.51)]]
    assert collapse_warning(cfg, curve) == (
        "warning: final test accuracy 0.510 (round 8) is 21 points under the run's best 0.720 "
        "(round 4): the model collapsed late; report best_accuracy beside it, or try a lower lr "
        "(now 0.05) or fewer local steps")
    curve[-1]["eval_accuracy"] = 0.63  # 9 points: within what a small test set moves
    assert collapse_warning(cfg, curve) is None
    assert collapse_warning(cfg, curve[:1]) is None
    assert collapse_warning(cfg, [{"round": 1, "train_loss": 0.3}]) is None


def test_a_second_writer_on_the_same_out_fails_at_once_naming_the_holder(tmp_path, capfd):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import os, sys; from pathlib import Path; "
         "from fedjax_lm.runner.rundir import locked\n"
         f"with locked(Path({str(out)!r})):\n    print(os.getpid(), flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        pid = int(holder.stdout.readline())
        assert error_line(*cli_train(out, capfd)) == (
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
    with pytest.raises(ConfigError, match=r"no client has a full batch: client sizes 32\.\.32 "
                                          r"with batch_size=64 and drop_last"):
        train(tiny(tmp_path, batch_size=64), progress=False)
    assert not (out / "config.yaml").exists()
    # A leftover config.yaml with no checkpoint (an older version's failed setup) binds nothing.
    (out / "config.yaml").write_text(yaml.safe_dump(tiny(tmp_path, lr=0.5).to_dict()))
    assert train(tiny(tmp_path, rounds=1), progress=False)["rounds"] == 1
    assert yaml.safe_load((out / "config.yaml").read_text())["lr"] == 0.05


def test_resume_refuses_other_data_naming_what_changed(tmp_path, copy_trained_run):
    import json

    run = tmp_path / "run"
    copy_trained_run(run)
    cfg = trained_config(run)
    exp = build_experiment(cfg)
    old = json.loads((run / "data.json").read_text())
    labels = (exp.train["label"] + 1) % exp.num_classes  # the same files, relabelled
    other = dataclasses.replace(exp, train={**exp.train, "label": labels},
                                partition=exp.partition[::-1])
    new = train_module.data_fingerprint(other)
    with pytest.raises(ResumeError) as err:
        train(cfg.replace(rounds=3), progress=False, exp=other)
    assert str(err.value) == (
        f"{run} holds 2 round(s) trained on other data (train_sha256: "
        f"{old['train_sha256'][:12]}… -> {new['train_sha256'][:12]}…; partition_sha256: "
        f"{old['partition_sha256'][:12]}… -> {new['partition_sha256'][:12]}…): the data "
        "directory, data files or tokenizer changed since. Resume with the original data, or "
        "use another --out.")
    assert train(cfg.replace(rounds=3), progress=False, exp=exp)["rounds"] == 3  # same data


@pytest.mark.slow
def test_a_killed_extension_does_not_leave_a_stale_final(tmp_path, monkeypatch, copy_trained_run):
    """Extending a finished run: once training continues, final.json no longer describes the
    directory, so a failure mid-extension must not leave the old one behind."""
    out = tmp_path / "run"
    copy_trained_run(out)
    cfg = trained_config(out).replace(rounds=3)
    poison_server(monkeypatch, "params", from_round=3)
    with pytest.raises(TrainingError, match="round 3: the server update"):
        train(cfg, progress=False)
    assert not (out / "final.json").exists() and checkpointed_round(out) == 2
    monkeypatch.undo()
    assert np.isfinite(train(cfg, progress=False)["final_train_loss"])


def test_a_non_finite_checkpoint_from_an_older_version_is_refused_on_resume(tmp_path,
                                                                            copy_trained_run):
    from fedjax_lm.runner.checkpoint import Checkpointer
    from fedjax_lm.runner.experiment import build_engine

    run = tmp_path / "run"
    copy_trained_run(run)
    cfg = trained_config(run)
    exp = build_experiment(cfg)
    ckpt = Checkpointer(run / "checkpoints")
    _, state, _ = ckpt.restore(build_engine(cfg, exp).init(exp.params, jax.random.key(0)))
    ckpt.save(3, state.replace(params=jax.tree.map(lambda x: x * jnp.nan, state.params)))
    ckpt.close()
    with pytest.raises(TrainingError) as err:
        train(cfg.replace(rounds=4), progress=False, exp=exp)
    assert str(err.value) == (
        f"the round-3 checkpoint in {run} holds non-finite server params (saved by a version "
        f"that did not check the server update); delete {run} to start over")


def test_a_run_from_changed_weight_files_is_neither_resumed_nor_reported_finished(tmp_path):
    """A run records the weight files it started from; a rerun after they changed would
    continue (or, finished, put into a sweep's table) a model of other weights: refused."""
    import hashlib
    import json

    from fedjax_lm.models.export import export_merged
    from fedjax_lm.runner import digest
    from fedjax_lm.runner.experiment import load_model

    folder, cfg = tmp_path / "weights", tiny(tmp_path, rounds=1)
    model, params, tokenizer = load_model(cfg, 4)  # the synthetic task: 4 classes
    export_merged(model.config, params, folder, tokenizer)
    cfg = cfg.replace(model=str(folder))
    train(cfg, progress=False)
    weights = hashlib.sha256(hashlib.sha256((folder / "model.safetensors").read_bytes())
                             .hexdigest().encode()).hexdigest()
    assert json.loads((tmp_path / "run" / "model.json").read_text()) == {
        "model": str(folder), "weights_sha256": weights}
    original = (folder / "model.safetensors").read_bytes()
    export_merged(model.config, jax.tree.map(lambda x: x + 1, params), folder, tokenizer)
    digest._file_sha256.cache_clear()  # as in the rerun's new process
    changed = digest.weights_identity(str(folder))["weights_sha256"]
    message = (f"{tmp_path / 'run'} holds 1 round(s) trained from other weights of --model "
               f"{folder} (weights_sha256: {weights[:12]}… -> {changed[:12]}…): its weight "
               "files changed since. Restore them, or use another --out.")
    for rounds in (1, 2):  # reported finished; continued
        with pytest.raises(ResumeError) as err:
            train(cfg.replace(rounds=rounds), progress=False)
        assert str(err.value) == message
    (folder / "model.safetensors").write_bytes(original)  # the advice: restore them
    assert train(cfg.replace(rounds=2), progress=False)["rounds"] == 2
    assert not (Path(train(tiny(tmp_path / "preset"), progress=False)["config"]["out"])
                / "model.json").exists()  # a random init has no files to record
