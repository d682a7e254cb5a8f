"""Resuming a grid reuses finished cells only under the config that produced them."""

import dataclasses
import json

import pytest

from fedjax_lm.grid import ResumeError, append_cell, execution_field, read_cells, resume_grid
from fedjax_lm.personalize import report


@dataclasses.dataclass(frozen=True)
class _Grid:
    name: str = execution_field("g")
    skews: tuple[float, ...] = (0.2, 1.0)
    seeds: tuple[int, ...] = (0,)
    eval_clients: int = 10
    data_dir: str | None = execution_field(None)


def _finish(out, cfg, cells):
    for cell in cells:
        append_cell(out, cell)
    report.write_meta(out, cfg, "cmd", 1.0)


def test_fresh_dir_has_no_cells(tmp_path):
    assert read_cells(tmp_path, _Grid(), ("skews", "seeds")) == []


def test_cells_come_back_in_order_and_the_grid_may_grow(tmp_path):
    cells = [{"skew": 0.2, "seed": 0, "acc": 0.5}, {"skew": 1.0, "seed": 0, "acc": 0.7}]
    _finish(tmp_path, _Grid(), cells)
    grown = _Grid(skews=(0.2, 0.3, 1.0), seeds=(0, 1, 2), data_dir="/elsewhere", name="h")
    assert read_cells(tmp_path, grown, ("skews", "seeds")) == cells


def test_a_changed_setting_refuses_to_mix_cells(tmp_path):
    _finish(tmp_path, _Grid(), [{"skew": 0.2, "seed": 0}])
    with pytest.raises(ResumeError) as err:
        read_cells(tmp_path, _Grid(eval_clients=20), ("skews", "seeds"))
    msg = str(err.value)
    assert "1 finished cell(s)" in msg and "eval_clients: 10 -> 20" in msg
    assert "Use another --out" in msg


def test_moe_driver_refuses_a_changed_config(tmp_path):
    from fedjax_lm.personalize import moe

    cfg = moe.MoeConfig(name="t", task="synthetic", eval_clients=3)
    _finish(tmp_path, cfg, [{"skew": 0.2, "seed": 0}])
    with pytest.raises(ResumeError, match="eval_clients: 3 -> 4"):
        moe.run(dataclasses.replace(cfg, eval_clients=4), tmp_path, "cmd")
    assert json.loads((tmp_path / "cells.jsonl").read_text()) == {"skew": 0.2, "seed": 0}


def test_an_experiment_report_writes_results_table_and_the_meta_resume_checks(tmp_path):
    from fedjax_lm.personalize import abu

    cfg = abu.AbuCifarConfig(activations=("relu", "elu"), seeds=(0, 1))
    rec = {"activation": "relu", "seeds": [0, 1], "test_acc": [0.5, 0.6],
           "best_val_acc": [0.5, 0.55], "best_step": [10, 20],
           "curve": [{"step": 10, "val_acc": [0.5, 0.4]}, {"step": 20, "val_acc": [0.4, 0.55]}],
           "wall_s": 30.25}
    append_cell(tmp_path, rec)
    abu.write_cifar_report(tmp_path, [rec], cfg, "cmd", 1.0)
    assert len((tmp_path / "results.csv").read_text().splitlines()) == 3  # header + 2 seeds
    assert "| relu | 55.0 ± 7.1 | 2 | – | – | 52.5 | 0/2 |" in (tmp_path / "table.md").read_text()
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["activations_done"] == 1 and meta["command"] == "cmd"
    assert not (tmp_path / "blend_weights.png").exists()  # no ABU run yet
    done, todo = resume_grid(tmp_path, cfg, {"activation": "activations"})
    assert done == [rec] and todo == [{"activation": "elu"}]
    with pytest.raises(ResumeError, match=r"lr: 0\.001 -> 0\.01"):
        resume_grid(tmp_path, dataclasses.replace(cfg, lr=1e-2), {"activation": "activations"})
    # A second activation: its per-seed differences to relu (paired by seed) and wins.
    elu = dict(rec, activation="elu", test_acc=[0.6, 0.55], best_step=[10, 60_000], wall_s=12.5)
    abu.write_cifar_report(tmp_path, [rec, elu], cfg, "cmd", 1.0)
    meta = json.loads((tmp_path / "meta.json").read_text())  # this invocation vs every cell's
    assert meta["wall_s"] == 1.0 and meta["cells_wall_s"] == 42.8  # 30.25 + 12.5, rounded
    assert "| elu | 57.5 ± 3.5 | 2 | 2.5 ± 10.6 | 1/2 | 52.5 | 1/2 |" in (
        tmp_path / "table.md").read_text()
    assert (tmp_path / "accuracy.png").is_file() and (tmp_path / "val_curves.png").is_file()
    assert "row − column" not in (tmp_path / "table.md").read_text()  # two: the column says it
    # A third: every pair's paired difference, row − column, ranked by mean accuracy
    # (tanh − relu per seed: +20, −10 points; tanh − elu: +10, −5).
    tanh = dict(rec, activation="tanh", test_acc=[0.7, 0.5])
    abu.write_cifar_report(tmp_path, [rec, elu, tanh], cfg, "cmd", 1.0)
    table = (tmp_path / "table.md").read_text()
    assert "| | tanh | elu | relu |" in table  # 60.0, 57.5, 55.0
    assert "| tanh | – | 2.5 ± 10.6 (1/2) | 5.0 ± 21.2 (1/2) |" in table
    assert "| relu | -5.0 ± 21.2 (1/2) | -2.5 ± 10.6 (1/2) | – |" in table
