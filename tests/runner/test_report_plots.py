"""The sweep report's accuracy-vs-round small multiples: what each panel holds."""

from __future__ import annotations

import numpy as np

from fedjax_lm.runner.report import round_panels


def _run(clients: int, seed: int, head: str, accs: list[float]) -> dict:
    config = {"model": "m", "task": "t", "clients": clients, "seed": seed, "head_init": head}
    metrics = [{"round": r + 1, "eval_accuracy": a} for r, a in enumerate(accs)]
    metrics.insert(1, {"round": 1, "train_loss": 0.5})  # rows without eval are skipped
    return {"config": config, "metrics": metrics}


def test_one_panel_per_other_field_one_curve_per_client_count_seeds_averaged() -> None:
    runs = [_run(c, s, h, [0.5 + 0.01 * c + 0.1 * s, 0.6 + 0.1 * s])
            for c in (1, 4) for s in (0, 1) for h in ("shared", "per_client")]
    runs.append(_run(16, 0, "shared", [0.5, 0.5, 0.5]))  # one seed, a longer run
    panels = round_panels(runs, ["model", "task", "clients", "head_init"])
    assert list(panels) == ["m · t\nhead_init=per_client", "m · t\nhead_init=shared"]
    shared = panels["m · t\nhead_init=shared"]
    assert sorted(shared) == [1, 4, 16]
    curve = shared[4]
    assert curve.rounds == [1, 2] and curve.seeds == 2
    np.testing.assert_allclose(curve.mean, [0.59, 0.65])
    # the seeds' sample std (ddof = 1), as in summary.md: two seeds 0.1 apart
    np.testing.assert_allclose(curve.std, [0.1 / np.sqrt(2)] * 2)
    assert shared[16].seeds == 1 and shared[16].rounds == [1, 2, 3]
    np.testing.assert_array_equal(shared[16].std, [0.0, 0.0, 0.0])
    assert sorted(panels["m · t\nhead_init=per_client"]) == [1, 4]
