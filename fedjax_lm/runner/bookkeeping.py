"""One run directory's bookkeeping across rounds, whoever runs the rounds (`train` one
federation, `vectorized` many in one program): open it (check, restore), record each round
(finite checks, metrics, evaluation, warnings, checkpoint), write final.json.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from fedjax_lm import federated as fl
from fedjax_lm.federated.trainable import split
from fedjax_lm.io import write_json, write_yaml
from fedjax_lm.runner import privacy
from fedjax_lm.runner.checkpoint import Checkpointer, saved_state
from fedjax_lm.runner.config import RunConfig
from fedjax_lm.runner.digest import data_fingerprint, params_digest
from fedjax_lm.runner.evaluation import CLIENT_ACCURACY_FILE, population_eval, predict_split
from fedjax_lm.runner.experiment import Experiment
from fedjax_lm.runner.guards import (
    TrainingError,
    collapse_warning,
    divergence_warning,
    nonfinite_error,
    nonfinite_server_parts,
)
from fedjax_lm.runner.metrics import MetricsLog
from fedjax_lm.runner.peft import communication
from fedjax_lm.runner.rundir import check_base, check_data, check_model


def evaluate(predict, params, exp: Experiment, batch_size: int) -> dict[str, float]:
    """Global test accuracy / loss, and the accuracy on each client's test shard (when the
    test set is large enough to give every client one)."""
    correct, nll = predict_split(predict, params, exp.test, batch_size)
    out = {"eval_loss": float(nll.mean()), "eval_accuracy": float(correct.mean())}
    shards = exp.test_shards
    if len(shards):
        per_client = np.array([correct[ix].mean() for ix in shards])  # as recorded before
        out.update(client_accuracy_min=float(per_client.min()),
                   client_accuracy_mean=float(per_client.mean()),
                   client_accuracy_max=float(per_client.max()))
    return out


class RunBook:
    """A run directory opened for training from `state` (round 0): after `__init__`, `start`
    is the round to resume at and `state` / `store` hold what was restored. Only the primary
    process writes (multi-host runs)."""

    def __init__(self, cfg: RunConfig, exp: Experiment, state: fl.ServerState,
                 store: fl.ClientStateStore | None, *, predict, primary: bool = True):
        self.cfg, self.exp, self.predict, self.primary = cfg, exp, predict, primary
        self.run_dir = run_dir = Path(cfg.out)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.ckpt = Checkpointer(run_dir / "checkpoints")
        start = self.ckpt.latest_round() or 0
        check_data(run_dir, data_fingerprint(exp), rounds_done=start, write=primary)
        check_base_of(run_dir, cfg, exp, rounds_done=start, write=primary)
        check_model(run_dir, cfg.model, rounds_done=start, write=primary)
        self.mask = exp.peft.trainable
        # Setup succeeded: only now does the directory record its config. A final.json of fewer
        # rounds no longer describes it once training continues.
        if primary:
            write_yaml(run_dir / "config.yaml", cfg.to_dict())
            (run_dir / "final.json").unlink(missing_ok=True)
        if start:
            start, state, store = self.ckpt.restore_trainable(self.mask, state, store)
            if bad_parts := nonfinite_server_parts(state):
                raise TrainingError(
                    f"the round-{start} checkpoint in {run_dir} holds non-finite server "
                    f"{bad_parts} (saved by a version that did not check the server update); "
                    f"delete {run_dir} to start over")
        self.start, self.state, self.store = start, state, store
        self.log = MetricsLog(run_dir, start, enabled=primary)
        self.warnings: list[str] = []
        self._closed = False

    def record(self, r: int, cohort: privacy.RoundCohort, state: fl.ServerState,
               metrics: fl.RoundMetrics, client_states: Any, t0: float, *,
               host_wait_s: float | None = None) -> dict[str, Any]:
        """Round `r` (0-based) has run: stop on a non-finite update (before anything is
        logged or saved, so the latest checkpoint is a good one), else log, evaluate, warn and
        checkpoint it."""
        cfg, exp, store = self.cfg, self.exp, self.store
        ids = cohort.real_ids
        bad = [int(i) for i in ids[~np.asarray(metrics.client_finite)[:len(ids)]]]
        server = nonfinite_server_parts(state, metrics.update_norm)
        stop = nonfinite_error(cfg, r + 1, ids, bad, server, self.run_dir,
                               self.ckpt.latest_round() or 0)
        if stop:
            raise TrainingError(stop)
        if store is not None:
            store.scatter(ids, cohort.real(client_states))
        self.state = state
        record: dict[str, Any] = {
            "round": r + 1,
            # None: nobody joined this (Poisson) round, so no client trained
            "train_loss": float(metrics.loss) if len(ids) else None,
            "update_norm": float(metrics.update_norm),
            "cohort_size": len(ids),  # this round's clients; config.clients: the population
            "skipped_clients": bad,
            # Per round: the trainable leaves down and up (the frozen base once, before), once
            # per message each way (SCAFFOLD: model and control variate); 0 in an empty round.
            "upload_bytes_per_client": client_bytes(cfg, exp, ids),
            "download_bytes_per_client": client_bytes(cfg, exp, ids),
            **privacy.round_record(cfg, state, r + 1, cohort),
        }
        if host_wait_s is not None:  # what this round waited for its data (not hidden by
            record["host_wait_s"] = host_wait_s  # prefetch)
        if (r + 1) % cfg.eval_every == 0 or r + 1 == cfg.rounds:
            record.update(evaluate(self.predict, state.params, exp, cfg.eval_batch_size))
            if cfg.eval_clients is not None:
                fields, per_client = population_eval(
                    self.predict, state.params, exp.train,
                    {"train": exp.partition, "heldout": exp.heldout}, cfg.eval_clients,
                    cfg.seed, r + 1, cfg.eval_batch_size)
                record.update(fields)
                if self.primary:
                    write_json(self.run_dir / CLIENT_ACCURACY_FILE, {"round": r + 1, **per_client})
        record["wall_s"] = time.perf_counter() - t0
        self.log.write(record)
        losses = [x["train_loss"] for x in self.log.records if x["train_loss"] is not None]
        if not self.warnings and losses and (warning := divergence_warning(
                cfg, r + 1, losses[-1], losses[0], exp.num_classes)):
            self.warnings.append(warning)
            if self.primary:
                tqdm.write(warning, file=sys.stderr)
        if cohort.dropped and self.primary:
            tqdm.write(privacy.truncation_warning(r + 1, cohort), file=sys.stderr)
        if cfg.checkpoint_every and ((r + 1) % cfg.checkpoint_every == 0
                                     or r + 1 == cfg.rounds):
            self.ckpt.save(r + 1, saved_state(self.mask, state), store and store.states)
        return record

    def close(self) -> None:
        """Wait for the last checkpoint, release the log and the checkpointer (once)."""
        if self._closed:
            return
        self._closed = True
        try:
            self.ckpt.wait()
        finally:
            self.log.close()
            self.ckpt.close()

    def final(self, setup_s: float) -> dict[str, Any]:
        """final.json's contents (written by the primary process). A run in which no round
        had a client raises TrainingError (its model is the initial one); one in which some
        rounds had none warns. The byte means are over the rounds that had clients."""
        cfg, exp, store = self.cfg, self.exp, self.store
        records = self.log.records
        trained = [x for x in records if x["cohort_size"]]
        if records and not trained:
            raise TrainingError(no_client_error(cfg, len(records), self.run_dir))
        if (empty := empty_rounds_warning(cfg, len(records) - len(trained), len(records))
                ) and empty not in self.warnings:
            self.warnings.append(empty)
            if self.primary:
                tqdm.write(empty, file=sys.stderr)
        if (collapse := collapse_warning(cfg, self.log.records)) and collapse not in self.warnings:
            self.warnings.append(collapse)
            if self.primary:
                tqdm.write(collapse, file=sys.stderr)
        final = summarize(self.log.records, cfg)
        final.update(setup_s=setup_s, params_sha256=params_digest(self.state.params),
                     client_state_sha256=store and params_digest(store.states),
                     num_clients=exp.num_clients, data_source=exp.source,
                     train_examples=int(exp.partition.sizes.sum()),
                     test_examples=int(len(exp.test["label"])),
                     steps_per_round=exp.steps_per_round, warnings=self.warnings,
                     **communication(trained, exp.peft),
                     **privacy.final_record(cfg, self.log.records))
        if self.primary:
            write_json(self.run_dir / "final.json", final)
        return final


def messages_per_direction(cfg: RunConfig) -> int:
    """How many trainable-sized trees a client receives, and sends, per round: SCAFFOLD sends
    the model and the control variate each way (server: x and c; client: y_i and Δc_i)."""
    return 2 if cfg.algorithm == "scaffold" else 1


def client_bytes(cfg: RunConfig, exp: Experiment, ids: np.ndarray) -> float:
    """Mean bytes one client of `ids` sends (= receives) this round; 0.0 when `ids` is empty."""
    return messages_per_direction(cfg) * exp.peft.client_bytes(ids)


def no_client_error(cfg: RunConfig, rounds: int, run_dir: Path) -> str:
    """Why a run in which no round had a client stops (one line)."""
    return (f"no round trained: all {rounds} rounds drew an empty cohort (sampling="
            f"{cfg.sampling}, expected cohort_size {cfg.cohort_size} of {cfg.clients} clients), "
            f"so the model is the untrained initial one; rerun with a larger --cohort-size (now "
            f"{cfg.cohort_size}) or --sampling fixed, in a new --out or after deleting {run_dir}")


def empty_rounds_warning(cfg: RunConfig, empty: int, rounds: int) -> str | None:
    """A one-line warning when `empty` of the run's `rounds` had no client, else None."""
    if not empty:
        return None
    return (f"warning: {empty} of {rounds} rounds had no client (sampling={cfg.sampling}, "
            f"expected cohort_size {cfg.cohort_size}) and trained nothing; final_train_loss is "
            f"from the last round that trained; raise --cohort-size (now {cfg.cohort_size}) or "
            f"use --sampling fixed")


def check_base_of(run_dir: Path, cfg: RunConfig, exp: Experiment, *, rounds_done: int,
                  write: bool) -> None:
    """Under PEFT: record the frozen base's identity, or refuse a resume onto another."""
    mask = exp.peft.trainable
    if mask is not None:
        check_base(run_dir, {"model": cfg.model,
                             "base_sha256": params_digest(split(mask, exp.params)[1])},
                   rounds_done=rounds_done, write=write)


def summarize(records: list[dict], cfg: RunConfig) -> dict[str, Any]:
    evals = [r for r in records if "eval_accuracy" in r]
    trained = [r for r in records if r["train_loss"] is not None]
    accs = [r["eval_accuracy"] for r in evals]
    target_round = None
    if cfg.target_accuracy is not None:
        target_round = next((r["round"] for r in evals if r["eval_accuracy"]
                             >= cfg.target_accuracy), None)
    return {
        "rounds": cfg.rounds,
        "final_accuracy": accs[-1] if accs else None,
        "best_accuracy": max(accs) if accs else None,
        "final_eval_loss": evals[-1]["eval_loss"] if evals else None,
        # the last round that trained (a Poisson round nobody joined has no loss)
        "final_train_loss": trained[-1]["train_loss"] if trained else None,
        "final_train_loss_round": trained[-1]["round"] if trained else None,
        "rounds_trained": len(trained),  # rounds in which at least one client trained
        "rounds_to_target": target_round,
        "train_wall_s": float(sum(r["wall_s"] for r in records)),
        "skipped_client_updates": int(sum(len(r["skipped_clients"]) for r in records)),
        "config": dataclasses.asdict(cfg),
    }
