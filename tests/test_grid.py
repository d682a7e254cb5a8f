"""The shared config-file loader, grid expansion and resume-by-cell rule (`fedjax_lm.grid`)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from fedjax_lm.grid import (
    ConfigError,
    ResumeError,
    append_cell,
    check_same_config,
    execution_field,
    execution_fields,
    expand_grid,
    load_yaml,
    resume_grid,
)

BAD_FILES = [
    ("base: [1\n", "{p} is not valid YAML: expected ',' or ']', but got '<stream end>' "
                   "(line 2, column 1)"),
    ("a: 1\n\tb: 2\n", "{p} is not valid YAML: found character '\\t' that cannot start any "
                       "token (line 2, column 1)"),
    ("- 1\n- 2\n", "{p}: expected a mapping, got list"),
    ("just text\n", "{p}: expected a mapping, got str"),
    ("# only a comment\n", "{p} holds no settings (empty, or only comments): write the "
                           "settings into it, or leave out --config to run the defaults"),
]


@pytest.mark.parametrize("text, message", BAD_FILES)
def test_a_bad_file_is_one_line(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_yaml(path)
    assert str(err.value) == message.format(p=path)
    assert "\n" not in str(err.value)


def test_missing_and_unknown_keys(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_yaml(tmp_path / "missing.yaml")
    assert str(err.value) == f"config file not found: {tmp_path / 'missing.yaml'}"
    with pytest.raises(ConfigError, match="config file not found"):
        load_yaml(tmp_path)  # a folder is not a config file
    path = tmp_path / "c.yaml"
    path.write_text("name: x\nsweeps: {}\nbase: {}\n")
    with pytest.raises(ConfigError) as err:
        load_yaml(path, keys=("name", "base", "sweep"))
    assert str(err.value) == f"{path}: unknown key(s) ['sweeps']; valid: ['base', 'name', 'sweep']"
    assert load_yaml(path, keys=("name", "base", "sweeps")) == {"name": "x", "sweeps": {},
                                                               "base": {}}


@pytest.mark.parametrize("text, message", BAD_FILES[:1] + BAD_FILES[2:3] + BAD_FILES[4:])
def test_every_loader_and_command_words_a_bad_file_the_same(tmp_path, capsys, text, message):
    from fedjax_lm.cli import main
    from fedjax_lm.personalize import abu, moe
    from fedjax_lm.personalize.config import load_config
    from fedjax_lm.runner.presets import load_preset

    path = tmp_path / "bad.yaml"
    path.write_text(text)
    want = message.format(p=path)
    for load in (load_preset, lambda p: load_config(moe.MoeConfig, p),
                 lambda p: load_config(abu.AbuCifarConfig, p)):
        with pytest.raises(ConfigError) as err:
            load(path)
        assert str(err.value) == want
    for command in ("train", "sweep", "moe", "abu"):
        assert main([command, "--config", str(path)]) == 2
        assert capsys.readouterr().err == f"fedjax-lm {command}: error: {want}\n"


def test_unknown_keys_name_the_file_and_the_valid_keys(tmp_path):
    from fedjax_lm.personalize import moe
    from fedjax_lm.personalize.config import load_config
    from fedjax_lm.runner.presets import load_preset

    path = tmp_path / "p.yaml"
    path.write_text("name: x\nsweeps: {clients: [1]}\n")
    with pytest.raises(ConfigError) as err:
        load_preset(path)
    assert str(err.value) == (f"{path}: unknown key(s) ['sweeps']; "
                              "valid: ['base', 'name', 'sweep', 'vectorize']")
    path.write_text("name: x\nfedavg: {roundz: 3}\n")
    with pytest.raises(ConfigError) as err:
        load_config(moe.MoeConfig, path)
    assert str(err.value).startswith(f"{path}.fedavg: unknown key(s) ['roundz']; valid: [")
    path.write_text("name: x\nfedavg: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(moe.MoeConfig, path)
    assert str(err.value) == f"{path}.fedavg: expected a mapping, got int"


def test_grid_expansion_order_and_counts():
    cells = expand_grid({"model": ["a", "b"], "clients": [1, 2, 4], "seed": (0,)})
    assert len(cells) == 6
    assert [(c["model"], c["clients"]) for c in cells] == [
        ("a", 1), ("a", 2), ("a", 4), ("b", 1), ("b", 2), ("b", 4)]  # first axis outermost
    assert all(c["seed"] == 0 and list(c) == ["model", "clients", "seed"] for c in cells)
    assert expand_grid({}) == [{}]  # no axes: one cell, the base config


@pytest.mark.parametrize("axes, message", [
    ({"clients": []}, "p.yaml: sweep.clients must be a non-empty list"),
    ({"clients": 4}, "p.yaml: sweep.clients must be a non-empty list"),
    ({"clients": "1,2"}, "p.yaml: sweep.clients must be a non-empty list"),
    ({"seed": [0, 1, 0]}, "p.yaml: sweep.seed lists 0 more than once"),
])
def test_a_bad_axis_is_refused(axes, message):
    with pytest.raises(ConfigError) as err:
        expand_grid(axes, where="p.yaml: sweep")
    assert str(err.value) == message


@dataclasses.dataclass(frozen=True)
class _Exp:
    name: str = execution_field("exp")
    seeds: tuple[int, ...] = (0, 1)
    skews: tuple[float, ...] = (0.5, 1.0)
    lr: float = 0.1
    data_dir: str | None = execution_field(None)


def _finish(out, cfg, cells):
    for cell in cells:
        append_cell(out, {**cell, "acc": 0.5})
    (out / "meta.json").write_text(json.dumps({"config": dataclasses.asdict(cfg)}))


def test_execution_fields_come_from_field_metadata():
    assert execution_fields(_Exp) == execution_fields(_Exp()) == {"name", "data_dir"}


def test_resume_skips_finished_cells_and_keeps_the_grid_order(tmp_path):
    axes = {"seed": "seeds", "skew": "skews"}
    done, todo = resume_grid(tmp_path, _Exp(), axes)
    assert done == []
    assert todo == [{"seed": 0, "skew": 0.5}, {"seed": 0, "skew": 1.0},
                    {"seed": 1, "skew": 0.5}, {"seed": 1, "skew": 1.0}]
    _finish(tmp_path, _Exp(), [todo[0], todo[2]])
    done, todo = resume_grid(tmp_path, _Exp(), axes)
    assert [(d["seed"], d["skew"]) for d in done] == [(0, 0.5), (1, 0.5)]
    assert todo == [{"seed": 0, "skew": 1.0}, {"seed": 1, "skew": 1.0}]
    # The axes may grow, and labels / data location may change.
    grown = _Exp(seeds=(0, 1, 2), name="renamed", data_dir="/elsewhere")
    done, todo = resume_grid(tmp_path, grown, axes)
    assert len(done) == 2 and len(todo) == 4 and todo[-1] == {"seed": 2, "skew": 1.0}
    # A kill mid-append leaves a torn last line: it is not a finished cell.
    with (tmp_path / "cells.jsonl").open("a") as f:
        f.write('{"seed": 0, "sk')
    assert len(resume_grid(tmp_path, _Exp(), axes)[0]) == 2


def test_resume_refuses_cells_made_under_a_different_config(tmp_path):
    _finish(tmp_path, _Exp(), [{"seed": 0, "skew": 0.5}])
    with pytest.raises(ResumeError) as err:
        resume_grid(tmp_path, _Exp(lr=0.2, skews=(0.5,)), {"seed": "seeds", "skew": "skews"})
    assert str(err.value) == (
        f"{tmp_path} holds 1 finished cell(s) from a different config (lr: 0.1 -> 0.2). "
        f"Use another --out, or delete {tmp_path / 'cells.jsonl'} to start over.")
    assert isinstance(err.value, ConfigError)  # the CLI prints it as one line, exit 2


def test_a_nested_difference_names_its_leaf_and_ignore_names_top_level_fields():
    old = {"run": {"lr": 0.1, "rounds": 2}, "seeds": (0, 1), "name": "a"}
    new = {"run": {"lr": 0.2, "rounds": 2}, "seeds": [0, 1], "name": "b"}  # tuple == list
    with pytest.raises(ResumeError) as err:
        check_same_config("out", "a run", old, new, ignore=("name",))
    assert str(err.value) == ("out holds a run from a different config (run.lr: 0.1 -> 0.2). "
                              "Use another --out, or delete out to start over.")
    check_same_config("out", "a run", old, new, ignore=("name", "run"))
