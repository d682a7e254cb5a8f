"""experiments/collapse_agnews_report.py: per-run outcomes and the quirks' paired effects
computed from run folders as the sweep writes them, checked against hand-computed values."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def report(experiment_script):
    return experiment_script("collapse_agnews_report")


def write_run(root: Path, head: str, pad: bool, clients: int, seed: int, curve: list[float],
              lr: float = 1e-4) -> None:
    d = root / "runs" / f"h={head},p={pad},c={clients},s={seed},lr={lr}"
    d.mkdir(parents=True)
    metrics = [{"round": 2 * (i + 1), "eval_accuracy": a} for i, a in enumerate(curve)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    (d / "data.json").write_text(json.dumps({"num_classes": 4}))
    config = {"task": "ag_news", "model": "minilm-distil", "head_init": head,
              "attend_to_padding": pad, "clients": clients, "seed": seed, "lr": lr}
    final = {"config": config, "final_accuracy": curve[-1], "best_accuracy": max(curve),
             "final_eval_loss": 1.0}
    (d / "final.json").write_text(json.dumps(final))


def test_outcomes_thresholds_against_chance(report, tmp_path):
    # chance 0.25: never above 0.35 -> untrained; 0.6 then 0.28 -> collapsed;
    # +0.05 over the last three evaluations -> climbing; flat at 0.6 -> trained
    curves = {"untrained": [0.25, 0.3, 0.34, 0.3, 0.3], "collapsed": [0.3, 0.6, 0.5, 0.4, 0.28],
              "climbing": [0.3, 0.4, 0.45, 0.48, 0.5], "trained": [0.3, 0.6, 0.6, 0.61, 0.6],
              # gained 8 points over three evaluations but ended 2 under its best
              "trained ": [0.3, 0.5, 0.6, 0.58, 0.58]}
    for seed, curve in enumerate(curves.values()):
        write_run(tmp_path, "shared", False, 8, seed, curve)
    runs = sorted(report.load_runs(tmp_path / "runs"), key=lambda r: r["config"]["seed"])
    assert [report.outcome(r) for r in runs] == [name.strip() for name in curves]


def test_paired_effects_and_table(report, tmp_path):
    # shared / no padding: 0.70, 0.60; per-client heads: 0.50, 0.50 -> -20 and -10 points;
    # attend to padding: 0.72, 0.58 -> +2 and -2 points; both: 0.40, 0.55 -> -30 and -5
    for seed, (base, per, pad, both) in enumerate([(0.70, 0.50, 0.72, 0.40),
                                                   (0.60, 0.50, 0.58, 0.55)]):
        write_run(tmp_path, "shared", False, 32, seed, [0.3, base, base, base, base])
        write_run(tmp_path, "per_client", False, 32, seed, [0.3, 0.6, per, per, per])
        write_run(tmp_path, "shared", True, 32, seed, [0.3, 0.5, 0.6, pad, pad])
        write_run(tmp_path, "per_client", True, 32, seed, [0.3, 0.6, both, both, both])
    assert report.main([str(tmp_path)]) == 0
    text = (tmp_path / "ablation.md").read_text()
    assert "| per-client heads | 0.0001 | 32 | 2 | -15.0 ± 7.1 |" in text
    assert "| attend to padding | 0.0001 | 32 | 2 | 0.0 ± 2.8 |" in text
    assert "| both | 0.0001 | 32 | 2 | -17.5 ± 17.7 |" in text
    # the base cell: finals 70 / 60, bests the same, flat for its last three evaluations
    assert ("| shared | false | 0.0001 | 32 | 2 | 65.0 ± 7.1 | 65.0 ± 7.1 | 1.000 ± 0.000 | "
            "0.0 ± 0.0 | 2 trained |") in text
    # per-client heads fell from 0.6 to 0.5 in both seeds: -10 points late, still 25 points
    # above chance, so not a collapse
    assert ("| per_client | false | 0.0001 | 32 | 2 | 50.0 ± 0.0 | 60.0 ± 0.0 | 1.000 ± 0.000 | "
            "-10.0 ± 0.0 | 2 trained |") in text
    # attend to padding gained 22 / 8 points over its last three evaluations; seed 0 ends at
    # its best (climbing), seed 1 two points under its 0.60 (trained)
    assert ("| shared | true | 0.0001 | 32 | 2 | 65.0 ± 9.9 | 66.0 ± 8.5 | 1.000 ± 0.000 | "
            "15.0 ± 9.9 | 1 trained, 1 climbing |") in text
    assert (tmp_path / "ablation.png").stat().st_size > 0


def test_no_runs_is_one_clear_error(report, tmp_path):
    with pytest.raises(SystemExit, match="no finished runs"):
        report.main([str(tmp_path)])
