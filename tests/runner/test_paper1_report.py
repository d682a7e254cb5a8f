"""experiments/paper1_powered_report.py: the convergence table computed from run folders as the
sweep writes them (final.json + metrics.jsonl), checked against hand-computed values."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def report(experiment_script):
    return experiment_script("paper1_powered_report")


def write_run(root: Path, name: str, config: dict, curve: list[float]) -> None:
    d = root / name
    d.mkdir(parents=True)
    metrics = [{"round": 2 * (i + 1), "eval_accuracy": a} for i, a in enumerate(curve)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    final = {"config": config, "final_accuracy": curve[-1], "best_accuracy": max(curve)}
    (d / "final.json").write_text(json.dumps(final))


def test_convergence_table_by_arm_and_client_count(report, tmp_path):
    base = {"task": "imdb", "model": "minilm", "client_optimizer": "sgd", "lr": 0.03}
    # C = 1: bests 0.80 and 0.60 -> target 0.95 * 0.70 = 0.665 (seed 1 never reaches it)
    write_run(tmp_path / "runs_sgd", "c1s0", {**base, "clients": 1, "seed": 0},
              [0.5, 0.7, 0.8, 0.8, 0.8])
    write_run(tmp_path / "runs_sgd", "c1s1", {**base, "clients": 1, "seed": 1},
              [0.5, 0.6, 0.6, 0.6, 0.6])
    # C = 32 reaches 0.665 at round 8 in one seed, never in the other
    write_run(tmp_path / "runs_sgd", "c32s0", {**base, "clients": 32, "seed": 0},
              [0.5, 0.5, 0.6, 0.7, 0.7])
    write_run(tmp_path / "runs_sgd", "c32s1", {**base, "clients": 32, "seed": 1},
              [0.5, 0.5, 0.5, 0.5, 0.6])
    # another arm in another folder: its own C = 1 target, never mixed with SGD's
    adam = {**base, "client_optimizer": "adam", "lr": 3e-4}
    write_run(tmp_path / "runs", "a1", {**adam, "clients": 1, "seed": 0},
              [0.9, 0.5, 0.5, 0.5, 0.5])
    assert report.main([str(tmp_path)]) == 0
    table = (tmp_path / "convergence.md").read_text().splitlines()
    rows = {tuple(c.strip() for c in line.strip("|").split("|")[2:4]): line
            for line in table if line.startswith("| imdb")}
    assert set(rows) == {("sgd 0.03", "1"), ("sgd 0.03", "32"), ("adam 0.0003", "1")}
    c1 = [c.strip() for c in rows[("sgd 0.03", "1")].strip("|").split("|")]
    # final 80 / 60, best 80 / 60, late gain (last - 3 evals back) 0.8-0.7 and 0.6-0.6
    assert c1[4:] == ["2", "70.0 ± 14.1", "70.0 ± 14.1", "5.0 ± 7.1", "4.0", "1/2"]
    c32 = [c.strip() for c in rows[("sgd 0.03", "32")].strip("|").split("|")]
    assert c32[4:] == ["2", "65.0 ± 7.1", "65.0 ± 7.1", "15.0 ± 7.1", "8.0", "1/2"]
    a1 = [c.strip() for c in rows[("adam 0.0003", "1")].strip("|").split("|")]
    assert a1[4:] == ["1", "50.0 ± 0.0", "90.0 ± 0.0", "0.0 ± 0.0", "2.0", "1/1"]
    assert (tmp_path / "convergence.png").stat().st_size > 0  # the SGD arm has 2 seeds


def test_cells_hold_per_seed_values(report):
    runs = [{"config": {"task": "t", "model": "m", "client_optimizer": "adam", "lr": 1e-4,
                        "clients": 4},
             "final_accuracy": 0.6, "best_accuracy": 0.7,
             "metrics": [{"round": r, "eval_accuracy": a}
                         for r, a in [(1, 0.5), (2, 0.7), (3, 0.6), (4, 0.6)]]}]
    (cell,) = report.cells(runs)
    assert cell.arm == "adam 0.0001" and cell.clients == 4
    assert cell.to_target is None  # no C = 1 cell: no target
    assert cell.late_gain == pytest.approx([0.1])  # 0.6 at round 4 - 0.5 at round 1


def test_no_runs_is_one_clear_error(report, tmp_path):
    with pytest.raises(SystemExit, match="no finished runs"):
        report.main([str(tmp_path)])
