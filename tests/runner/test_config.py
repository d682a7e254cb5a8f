"""Configs: typed, validated before any work, overridable from the command line."""

import json
import subprocess
import sys
import typing

import pytest

from fedjax_lm.grid import ConfigError
from fedjax_lm.runner import config as rc
from fedjax_lm.runner.checks import from_dict
from fedjax_lm.runner.presets import Preset, load_preset, parse_overrides
from fedjax_lm.runner.sweep import expand


def test_defaults_validate_and_round_trip():
    cfg = rc.RunConfig()
    assert from_dict(cfg.to_dict()) == cfg
    assert cfg.replace(clients=8).clients == 8


@pytest.mark.parametrize(
    "values, message",
    [
        ({"clientz": 3}, r"unknown config field\(s\): clientz; valid fields: task"),
        ({"clients": "many"}, "clients must be int, got 'many'"),
        ({"clients": 2.5}, "clients must be int"),
        ({"lr": True}, "lr must be float"),
        ({"drop_last": "maybe"}, "drop_last must be bool"),
        ({"clients": 0}, "clients must be >= 1"),
        ({"p": 1.5}, r"p must be in \[0, 1\]"),
        ({"alpha": 0}, "alpha must be > 0"),
        ({"local_steps": 4}, "set exactly one of local_epochs / local_steps"),
        ({"cohort_size": 9, "clients": 4}, r"cohort_size must be in \[1, clients=4\]"),
        ({"backend": "tpu"}, "unknown backend 'tpu'"),
        ({"chunk_executor": "threads"}, "unknown chunk_executor 'threads'"),
        ({"algorithm": "fedsgd"}, "unknown algorithm 'fedsgd'; choose one of fedavg, fedprox"),
        ({"algorithm": "fedprox"}, "algorithm fedprox needs prox_mu > 0"),
        ({"algorithm": "scaffold", "client_optimizer": "adam"}, "scaffold runs plain local SGD"),
        ({"aggregator": "coordinate_median", "clients_per_chunk": 2},
         "needs every client's message at once and cannot run in chunks"),
        ({"server_optimizer": "sgd"}, "server_optimizer must be one of"),
        ({"task": "mnist"}, "unknown task 'mnist'"),
        ({"partition": "random"}, "unknown partition 'random'"),
        ({"task": "csv"}, "task csv needs --train-file"),
        ({"rounds": None}, "rounds may not be empty"),
        ({"task": "imdb", "dedupe": True}, "dedupe applies to blog10, blog50 .*: drop --dedupe"),
    ],
)
def test_bad_configs_fail_with_one_clear_message(values, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(values)


def test_every_float_field_refuses_inf_and_nan():
    floats = [name for name, hint in rc.HINTS.items() if float in (hint, *typing.get_args(hint))]
    assert {"lr", "server_lr", "momentum", "weight_decay", "prox_mu", "alpha", "beta"} <= set(
        floats)
    for name in floats:
        for bad in ("inf", "-inf", "nan", float("inf"), float("nan")):
            with pytest.raises(ConfigError, match=rf"^{name} must be a finite number, got "):
                from_dict({name: bad})


def test_strings_from_the_command_line_are_coerced():
    cfg = from_dict(parse_overrides(
        ["clients=8", "lr=1e-4", "drop_last=false", "cohort_size=none", "local-epochs=1"]))
    assert (cfg.clients, cfg.lr, cfg.drop_last, cfg.cohort_size) == (8, 1e-4, False, None)
    with pytest.raises(ConfigError, match="must look like field=value"):
        parse_overrides(["clients"])


def test_preset_loading_and_sweep_expansion(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("name: demo\nbase:\n  task: synthetic\n  rounds: 2\n"
                    "sweep:\n  clients: [1, 2, 4]\n  seed: [0, 1]\n")
    preset = load_preset(path)
    cells = expand(preset, {"lr": 0.1}, tmp_path / "out")
    assert len(cells) == 6
    assert {(c.clients, c.seed) for c in cells} == {(c, s) for c in (1, 2, 4) for s in (0, 1)}
    assert all(c.lr == 0.1 and c.rounds == 2 for c in cells)
    assert cells[0].out == str(tmp_path / "out" / "clients=1,seed=0")
    # A command-line override of a swept field replaces that axis of the grid.
    assert len(expand(preset, {"clients": 8}, tmp_path / "out")) == 2

    path.write_text("base:\n  rounds: 2\nsweep:\n  clients: [1, 0]\n")
    with pytest.raises(ConfigError, match="sweep cell clients=0: clients must be >= 1"):
        expand(load_preset(path), {}, tmp_path)
    path.write_text("base:\n  roundz: 2\n")
    with pytest.raises(ConfigError, match="unknown config field"):
        load_preset(path)
    path.write_text("base: [1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_preset(path)
    with pytest.raises(ConfigError, match="config file not found"):
        load_preset(tmp_path / "missing.yaml")


def test_committed_presets_are_valid():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "experiments"
    presets = sorted(root.glob("*.yaml"))
    assert any(p.name == "quick.yaml" for p in presets)
    for path in presets:
        text = path.read_text()
        if "\nbase:" not in text and not text.startswith("base:"):
            continue  # experiment configs of other subcommands (moe, abu) have their own schema
        assert text.startswith("#"), f"{path.name} must start with the command that runs it"
        preset = load_preset(path)
        assert expand(preset, {}, Path("/tmp/x")), path.name


def test_cli_reports_errors_in_one_line_without_traceback(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "fedjax_lm.cli", "train", "--clients", "0",
         "--out", str(tmp_path / "r")],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 2
    assert out.stderr.strip() == "fedjax-lm train: error: clients must be >= 1, got 0"
    assert not (tmp_path / "r").exists()  # nothing was started


@pytest.mark.parametrize("flags, message", [
    (["--algorithm", "fedsgd"],
     "unknown algorithm 'fedsgd'; choose one of fedavg, fedprox, scaffold"),
    (["--aggregator", "coordinate_median", "--clients-per-chunk", "2"],  # the old name: alias
     "aggregator 'median' needs every client's message at once and cannot run in "
     "chunks (clients_per_chunk=2); unset clients_per_chunk or use backend vmap/mesh/loop"),
    (["--server-lr", "inf"], "server_lr must be a finite number, got 'inf'"),
    (["--algorithm", "scaffold", "--client-optimizer", "adam"],
     "algorithm scaffold runs plain local SGD with its own client state: set "
     "client_optimizer=sgd, momentum=0, prox_mu=0 and carry_client_state=false"),
])
def test_cli_refuses_bad_algorithm_choices_in_one_line(tmp_path, capfd, flags, message):
    """In-process (`cli.main`): the real process's stderr is checked by the test above."""
    from fedjax_lm.cli import main

    code = main(["train", *flags, "--out", str(tmp_path / "r")])
    assert code == 2
    assert capfd.readouterr().err.strip() == f"fedjax-lm train: error: {message}"
    assert not (tmp_path / "r").exists()


def test_execution_fields_are_marked_once_and_drive_resume_and_reports():
    from fedjax_lm.runner import report

    execution, resumable = rc.EXECUTION_FIELDS, rc.RESUMABLE_FIELDS
    assert execution == {"out", "data_dir", "backend", "clients_per_chunk", "chunk_executor",
                         "eval_batch_size", "checkpoint_every", "prefetch"}
    assert resumable == execution | {"rounds"}
    runs = [{"config": rc.RunConfig(backend=b, lr=lr, seed=s).to_dict()}
            for b, lr, s in (("vmap", 0.1, 0), ("loop", 0.2, 1))]
    assert report.varying_fields(runs) == ["model", "task", "clients", "lr"]


def test_sweep_refuses_a_cell_made_under_another_config_before_running_any(tmp_path):
    from fedjax_lm.grid import ResumeError
    from fedjax_lm.io import write_yaml
    from fedjax_lm.runner.sweep import check_resumable, run_sweep

    preset = Preset(name="t", base={"rounds": 2}, grid={"clients": [1, 2]})
    cells = expand(preset, {}, tmp_path)
    old = tmp_path / "clients=2"
    write_yaml(old / "config.yaml", cells[1].replace(lr=0.5).to_dict())
    check_resumable(cells)  # nothing trained there yet: the folder binds nothing
    final = {"rounds": 1, "config": cells[1].replace(rounds=1).to_dict()}  # as train writes it
    (old / "final.json").write_text(json.dumps(final))
    # More rounds and execution-only changes resume the run.
    write_yaml(old / "config.yaml", cells[1].replace(rounds=1, backend="loop").to_dict())
    check_resumable(cells)
    write_yaml(old / "config.yaml", cells[1].replace(lr=0.5, backend="loop").to_dict())
    with pytest.raises(ResumeError) as err:
        run_sweep(preset, {}, tmp_path, progress=False)
    assert str(err.value) == (f"{old} holds a run from a different config (lr: 0.5 -> 2e-05). "
                              f"Use another --out, or delete {old} to start over.")
    assert not (tmp_path / "clients=1").exists()  # refused before the first cell ran
    write_yaml(old / "config.yaml", cells[1].to_dict())
    final = {"rounds": 3, "config": cells[1].replace(rounds=3).to_dict()}
    (old / "final.json").write_text(json.dumps(final))  # the preset now asks for fewer rounds
    with pytest.raises(ResumeError, match=r"holds a run trained for 3 rounds: --rounds 2 cannot"):
        check_resumable(cells)


def test_dedupe_reaches_the_blog_loader(monkeypatch):
    """`dedupe: true` is passed to the task loader (and only when set)."""
    from fedjax_lm.runner import experiment

    seen = []

    class Stop(Exception):
        pass

    def fake_load_task(name, data_dir, **kw):
        seen.append((name, kw.get("dedupe")))
        raise Stop

    monkeypatch.setattr(experiment.fdata, "load_task", fake_load_task)
    for dedupe in (True, False):
        with pytest.raises(Stop):
            experiment.build_experiment(rc.RunConfig(task="blog10", dedupe=dedupe))
    assert seen == [("blog10", True), ("blog10", None)]


def test_sweep_cells_that_compute_the_same_run_are_refused(tmp_path):
    """An axis the cell's partition ignores (alpha under iid) would name one run twice."""
    preset = Preset("t", {"rounds": 1}, {"alpha": [0.1, 10.0]})
    with pytest.raises(ConfigError) as err:
        expand(preset, {}, tmp_path)
    assert str(err.value) == (
        "sweep cells alpha=0.1 and alpha=10.0 are the same run: alpha is read by --partition "
        "dirichlet, not by --partition iid; drop that axis or set what uses it")
    assert len(expand(preset, {"partition": "dirichlet"}, tmp_path)) == 2
    both = Preset("t", {}, {"partition": ["iid", "dirichlet"], "alpha": [0.1, 1.0]})
    with pytest.raises(ConfigError, match="^sweep cells partition=iid,alpha=0.1 and "
                                          "partition=iid,alpha=1.0 are the same run"):
        expand(both, {}, tmp_path)
    # a sweep over how cells execute is a comparison the user asked for: two runs
    assert len(expand(Preset("t", {}, {"backend": ["loop", "vmap"]}), {}, tmp_path)) == 2
    # the aggregators' parameters likewise (byzantine: Krum and Multi-Krum)
    robust = Preset("t", {"clients": 8}, {"aggregator": ["mean", "krum"], "byzantine": [1, 2]})
    with pytest.raises(ConfigError) as err:
        expand(robust, {}, tmp_path)
    assert str(err.value) == (
        "sweep cells aggregator=mean,byzantine=1 and aggregator=mean,byzantine=2 are the same "
        "run: byzantine is read by --aggregator krum or multi_krum, not by --aggregator mean; "
        "drop that axis or set what uses it")


def test_parameters_given_for_a_run_or_sweep_that_nothing_reads_are_refused(tmp_path):
    """`--trim-fraction` with the mean, `--alpha` under iid: the user meant another setting.
    A preset's base may set them for the cells that read them; a sweep override is refused
    only when no cell reads it."""
    from fedjax_lm.runner.checks import check_given_used

    cfg = rc.RunConfig(aggregator="mean", trim_fraction=0.2, norm_bound=1.0)
    with pytest.raises(ConfigError) as err:
        check_given_used(cfg, ["trim_fraction", "norm_bound", "lr"])
    assert str(err.value) == (
        "--trim-fraction is read by --aggregator trimmed_mean, not by --aggregator mean; "
        "--norm-bound is read by --aggregator norm_bound, not by --aggregator mean: drop them "
        "or set what reads them")
    check_given_used(cfg.replace(aggregator="trimmed_mean"), ["trim_fraction"])  # read: fine
    check_given_used(cfg, [])  # set by a preset, not given: fine
    base = Preset("t", {"trim_fraction": 0.3}, {"aggregator": ["mean", "trimmed_mean"]})
    assert len(expand(base, {}, tmp_path)) == 2
    assert len(expand(base, {"trim_fraction": 0.2}, tmp_path)) == 2  # one cell reads it
    with pytest.raises(ConfigError, match=r"^--alpha is read by --partition dirichlet, not by "
                                          r"--partition iid: drop it or set what reads it$"):
        expand(base, {"alpha": 0.3}, tmp_path)
