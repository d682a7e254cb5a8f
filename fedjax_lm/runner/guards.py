"""The training loop's guards: a round whose clients or server update went non-finite stops
with advice that works (and the last good checkpoint kept); a diverging loss warns, and so does
a run whose final model fell far below its own best (a late collapse)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import jax
import numpy as np

from fedjax_lm import federated as fl
from fedjax_lm.federated.tree import tree_all_finite
from fedjax_lm.runner.config import RunConfig

# A train loss above either multiple is divergence: warn (a run at chance accuracy otherwise
# finishes looking like any other).
LOSS_GROWTH = 100  # x round 1's train loss
CHANCE_MULTIPLE = 10  # x a uniform guess's loss, ln(num_classes): catches blowing up in round 1
# A final test accuracy this far under the run's best evaluation is a collapse, not noise (a
# few hundred test examples move accuracy by ~3 points).
COLLAPSE_POINTS = 0.10


class TrainingError(RuntimeError):
    """A run that had to stop (e.g. a non-finite client update under policy `fail`)."""


@jax.jit
def _server_finite(state: fl.ServerState) -> tuple[jax.Array, jax.Array]:
    return tree_all_finite(state.params), tree_all_finite(state.opt_state)


def nonfinite_server_parts(state: fl.ServerState, update_norm: Any = 0.0) -> str | None:
    """What of the server's new state holds a NaN/Inf ("params", ...), or None. A step whose
    norm overflows counts too: finite params that far off (~1e19) are already lost."""
    params_ok, opt_ok = (bool(x) for x in _server_finite(state))
    checks = (("params", params_ok), ("optimizer state", opt_ok),
              ("step norm", math.isfinite(float(update_norm))))
    return " and ".join(name for name, ok in checks if not ok) or None


def _advice(fixes: str, run_dir: Path, last_good: int) -> str:
    """Advice that works: the directory resumes only its own config, so a changed config
    needs a new --out unless nothing was checkpointed (then the directory binds nothing)."""
    if not last_good:
        return f"No round was checkpointed, so {run_dir} can be reused: rerun with {fixes}."
    return (f"The last good checkpoint is round {last_good} (kept). Rerun with {fixes} in a new "
            f"--out ({run_dir} resumes only its own config), or delete {run_dir} to start over.")


def nonfinite_error(cfg: RunConfig, round_number: int, ids: np.ndarray, bad: list[int],
                    server_parts: str | None, run_dir: Path, last_good: int) -> str | None:
    """Why this round must stop (clients or the server update went non-finite), or None."""
    lower_lr = f"a lower lr (now {cfg.lr:g})"
    if bad and len(bad) == len(ids) and cfg.nonfinite == "skip":
        return (f"round {round_number}: every client of the round ({bad}) produced a "
                "non-finite update (NaN/Inf), so nothing was trained and there is no loss to "
                f"report; stopping. {_advice(lower_lr, run_dir, last_good)}")
    if bad and cfg.nonfinite == "fail":
        fixes = lower_lr if len(bad) == len(ids) else f"{lower_lr} or nonfinite=skip"
        return (f"round {round_number}: client(s) {bad} produced a non-finite update (NaN/Inf); "
                f"stopping. {_advice(fixes, run_dir, last_good)}")
    if server_parts:
        fixes = f"a lower server_lr (now {cfg.server_lr:g}) or {lower_lr}"
        return (f"round {round_number}: the server update (server_optimizer="
                f"{cfg.server_optimizer}, server_lr={cfg.server_lr:g}) made the server "
                f"{server_parts} non-finite (NaN/Inf) from finite client updates; stopping. "
                f"{_advice(fixes, run_dir, last_good)}")
    return None


def divergence_warning(cfg: RunConfig, round_number: int, loss: float, first: float,
                       num_classes: int) -> str | None:
    """A one-line warning when the train loss is orders of magnitude too large, else None."""
    chance = math.log(max(num_classes, 2))
    if loss > CHANCE_MULTIPLE * chance:
        why = f"{loss / chance:.0f}x a uniform guess's (ln {num_classes} = {chance:.3g})"
    elif first > 0 and loss > LOSS_GROWTH * first:
        why = f"{loss / first:.0f}x round 1's ({first:.3g})"
    else:
        return None
    return (f"warning: round {round_number} train loss {loss:.4g} is {why}: the run is "
            f"diverging; try a lower lr (now {cfg.lr:g}) or server_lr (now {cfg.server_lr:g})")


def collapse_warning(cfg: RunConfig, records: list[dict]) -> str | None:
    """A one-line warning when the last evaluation's accuracy is `COLLAPSE_POINTS` or more under
    the run's best (the final model is what the run keeps and reports first), else None."""
    evals = [(r["round"], r["eval_accuracy"]) for r in records if "eval_accuracy" in r]
    if len(evals) < 2:
        return None
    best_round, best = max(evals, key=lambda e: e[1])
    last_round, last = evals[-1]
    if best - last < COLLAPSE_POINTS:
        return None
    return (f"warning: final test accuracy {last:.3f} (round {last_round}) is "
            f"{100 * (best - last):.0f} points under the run's best {best:.3f} (round "
            f"{best_round}): the model collapsed late; report best_accuracy beside it, or try a "
            f"lower lr (now {cfg.lr:g}) or fewer local steps")
