"""The one canonical training loop: rounds, evaluation, metrics, checkpoints, resume.

Rerunning the same command in the same run directory resumes from the last checkpoint;
because data order and client sampling are pure functions of (seed, round), a run killed
and resumed ends bitwise identical to an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from fedjax_lm import federated as fl
from fedjax_lm.federated.trainable import split, trainable_part
from fedjax_lm.federated.tree import tree_all_finite
from fedjax_lm.io import write_json, write_yaml
from fedjax_lm.models import classification_stats
from fedjax_lm.runner import privacy
from fedjax_lm.runner.checkpoint import Checkpointer, saved_state
from fedjax_lm.runner.config import RunConfig, from_dict
from fedjax_lm.runner.evaluation import CLIENT_ACCURACY_FILE, population_eval, predict_split
from fedjax_lm.runner.experiment import (
    Experiment,
    build_engine,
    build_experiment,
    client_optimizer,
    round_data,
)
from fedjax_lm.runner.metrics import MetricsLog
from fedjax_lm.runner.peft import communication
from fedjax_lm.runner.prefetch import RoundFeeder
from fedjax_lm.runner.rundir import check_base, check_data, check_resumable, locked
from fedjax_lm.scale.distributed import is_primary

# A train loss above either multiple is divergence: warn (a run at chance accuracy otherwise
# finishes looking like any other).
LOSS_GROWTH = 100  # x round 1's train loss
CHANCE_MULTIPLE = 10  # x a uniform guess's loss, ln(num_classes): catches blowing up in round 1


class TrainingError(RuntimeError):
    """A run that had to stop (e.g. a non-finite client update under policy `fail`)."""


_HASH_CHUNK = 1 << 24  # bytes hashed at a time: a memory-mapped store is never copied whole


def params_digest(params: Any) -> str:
    """SHA-256 over every parameter's bytes: equal digests mean bitwise-equal models."""
    h = hashlib.sha256()
    for path, leaf in sorted(jax.tree_util.tree_leaves_with_path(params), key=lambda x: str(x[0])):
        h.update(jax.tree_util.keystr(path).encode())
        _update(h, leaf)
    return h.hexdigest()


def _update(h: Any, leaf: Any) -> None:
    """h.update(leaf's bytes), in row chunks for large arrays (the same digest as whole)."""
    arr = np.asarray(leaf)
    if arr.nbytes <= _HASH_CHUNK or arr.ndim == 0:
        h.update(arr.tobytes())
        return
    rows = max(1, _HASH_CHUNK // max(1, arr[0].nbytes))
    for start in range(0, len(arr), rows):
        h.update(np.ascontiguousarray(arr[start:start + rows]).tobytes())


def partition_digest(*indices: Any) -> str:
    """`params_digest([list(a), list(b), ...])` of client index arrays, without building the
    per-client list (10^6 clients): the same digest resumed runs recorded before `ClientIndex`."""
    keyed = []
    for i, index in enumerate(indices):
        for c in range(len(index)):
            path = (jax.tree_util.SequenceKey(i), jax.tree_util.SequenceKey(c))
            keyed.append((str(path), jax.tree_util.keystr(path), i, c))
    keyed.sort(key=lambda x: x[0])
    h = hashlib.sha256()
    for _, key, i, c in keyed:
        h.update(key.encode())
        h.update(np.asarray(indices[i][c]).tobytes())
    return h.hexdigest()


def data_fingerprint(exp: Experiment) -> dict[str, Any]:
    """What a resumed run must train on again: the tokenised splits and the partition."""
    out = {
        "train_examples": int(len(exp.train["label"])),
        "test_examples": int(len(exp.test["label"])),
        "num_classes": exp.num_classes,
        "train_sha256": params_digest(exp.train),
        "test_sha256": params_digest(exp.test),
        "partition_sha256": partition_digest(exp.partition, exp.test_shards),
        "source": exp.source,
    }
    if exp.heldout is not None:
        out["heldout_sha256"] = partition_digest(exp.heldout)
    return out


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


def make_predict(model):
    """Per-example (correct, nll) for a batch, in eval mode."""

    def predict(params, batch):
        nll, correct = classification_stats(model.apply(params, batch, train=False).logits,
                                            batch["label"])
        return correct, nll

    return jax.jit(predict)


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


def memory_plan_lines(cfg: RunConfig, exp: Experiment, engine) -> list[str]:
    """What `fedjax-lm plan` reports, logged before round 1. The compiled estimate (two
    compiles of the chunk program) runs on accelerators only; on a CPU host memory is
    plentiful and the shape-only client-state figure is printed."""
    from fedjax_lm.scale import memory as mem

    f = mem.format_bytes
    trainable = trainable_part(exp.peft.trainable, exp.params)
    params = mem.tree_bytes(trainable)
    optimizer = client_optimizer(cfg)
    opt = mem.tree_bytes(jax.eval_shape(optimizer.init, trainable))
    lines = [f"memory: params {f(mem.tree_bytes(exp.params))}"
             f"{f', trainable {f(params)}' if exp.peft.trainable is not None else ''}; "
             f"per client state {f(2 * params + opt)} "
             f"(trainable params + {cfg.client_optimizer} state + delta)"]
    if jax.default_backend() != "cpu":
        batch = mem.text_batch(exp.steps_per_round, cfg.batch_size, cfg.max_length)
        est = mem.estimate_memory(_loss(exp), exp.params, optimizer, batch)
        stats = jax.devices()[0].memory_stats() or {}
        budget = int(0.9 * stats.get("bytes_limit", 0)) or None
        width = cfg.clients_per_chunk or exp.num_clients
        lines.append(f"memory: compiled {f(est.per_client_bytes)} per client, fixed "
                     f"{f(est.fixed_bytes)}; this round's chunk of {width} needs "
                     f"{f(est.chunk_bytes(width))}" + (
                         f" of {f(budget)}; widest chunk that fits: "
                         f"{mem.widest_fitting(est, exp.num_clients, budget)}" if budget else ""))
    return lines


def _loss(exp: Experiment):
    from fedjax_lm.models import classification_loss

    return classification_loss(exp.model)


def train(
    cfg: RunConfig, *, progress: bool = True, exp: Experiment | None = None
) -> dict[str, Any]:
    """Run (or resume, or return the result of a finished) federated run in `cfg.out`,
    holding the directory's lock throughout."""
    cfg = from_dict(cfg.to_dict())  # a RunConfig built directly has not been validated
    run_dir = Path(cfg.out)
    # Multi-host: every process trains (and joins orbax's collective save); only process 0
    # locks the directory and writes config, metrics, TensorBoard and results.
    primary = is_primary()
    with locked(run_dir, enabled=primary):
        finished = check_resumable(cfg, run_dir)
        if finished is not None:
            return finished
        return _train(cfg, run_dir, primary, progress, exp)


def _train(cfg: RunConfig, run_dir: Path, primary: bool, progress: bool,
           exp: Experiment | None) -> dict[str, Any]:
    t_setup = time.perf_counter()
    exp = exp or build_experiment(cfg)
    engine = build_engine(cfg, exp)
    base_key = jax.random.key(cfg.seed)
    state = engine.init(exp.params, base_key)
    store = (engine.new_store(exp.params, exp.num_clients) if engine.algorithm.stateful
             else None)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt = Checkpointer(run_dir / "checkpoints")
    start = ckpt.latest_round() or 0
    check_data(run_dir, data_fingerprint(exp), rounds_done=start, write=primary)
    check_base_of(run_dir, cfg, exp, rounds_done=start, write=primary)
    mask = exp.peft.trainable
    # Setup succeeded: only now does the directory record its config. A final.json of fewer
    # rounds no longer describes it once training continues.
    if primary:
        write_yaml(run_dir / "config.yaml", cfg.to_dict())
        (run_dir / "final.json").unlink(missing_ok=True)
    if start:
        start, state, store = ckpt.restore_trainable(mask, state, store)
        if bad_parts := nonfinite_server_parts(state):
            raise TrainingError(
                f"the round-{start} checkpoint in {run_dir} holds non-finite server "
                f"{bad_parts} (saved by a version that did not check the server update); "
                f"delete {run_dir} to start over")
    log = MetricsLog(run_dir, start, enabled=primary)
    predict = make_predict(exp.model)
    setup_s = time.perf_counter() - t_setup
    if primary and progress:
        for line in memory_plan_lines(cfg, exp, engine):
            tqdm.write(line)
    if primary:
        for line in privacy.plan(cfg).lines(cfg):
            tqdm.write(line)

    warnings: list[str] = []
    bar = tqdm(total=cfg.rounds, initial=start, desc=run_dir.name, disable=not progress,
               unit="round", leave=False)

    def make_round(r: int) -> tuple[privacy.RoundCohort, dict]:
        """Round r's cohort and its packed data, on the device: a pure function of (cfg, r)."""
        cohort = privacy.draw_cohort(cfg, base_key, r)
        data = cohort.zero_padding(round_data(cfg, exp, r, cohort.ids))
        # one device: transfer it here too (the mesh / pmap executors place their own shards)
        return cohort, jax.device_put(data) if cfg.backend == "vmap" else data

    feeder = RoundFeeder(make_round, ahead=cfg.prefetch)
    try:
        for r, (cohort, data), host_wait_s in feeder.rounds(start, cfg.rounds):
            t0 = time.perf_counter() - host_wait_s
            ids = cohort.real_ids
            cs = store and store.gather(cohort.ids)
            state, metrics, cs = engine.run_round(state, data, client_ids=cohort.ids,
                                                  client_states=cs)
            bad = [int(i) for i in ids[~np.asarray(metrics.client_finite)[:len(ids)]]]
            # Checked before anything is logged or checkpointed: only finite states are saved,
            # so the latest checkpoint is a good one.
            server = nonfinite_server_parts(state, metrics.update_norm)
            stop = nonfinite_error(cfg, r + 1, ids, bad, server, run_dir, ckpt.latest_round() or 0)
            if stop:
                raise TrainingError(stop)
            if store is not None:
                store.scatter(ids, cohort.real(cs))
            record: dict[str, Any] = {
                "round": r + 1,
                # None: nobody joined this (Poisson) round, so no client trained
                "train_loss": float(metrics.loss) if len(ids) else None,
                "update_norm": float(metrics.update_norm),
                "cohort_size": len(ids),  # this round's clients; config.clients: the population
                "skipped_clients": bad,
                # Per round: the trainable leaves down and up (the frozen base once, before).
                "upload_bytes_per_client": exp.peft.client_bytes(ids),
                "download_bytes_per_client": exp.peft.client_bytes(ids),
                **privacy.round_record(cfg, state, r + 1, cohort),
                # what this round waited for its data (packing not hidden by prefetch)
                "host_wait_s": host_wait_s,
            }
            if (r + 1) % cfg.eval_every == 0 or r + 1 == cfg.rounds:
                record.update(evaluate(predict, state.params, exp, cfg.eval_batch_size))
                if cfg.eval_clients is not None:
                    fields, per_client = population_eval(
                        predict, state.params, exp.train,
                        {"train": exp.partition, "heldout": exp.heldout}, cfg.eval_clients,
                        cfg.seed, r + 1, cfg.eval_batch_size)
                    record.update(fields)
                    if primary:
                        write_json(run_dir / CLIENT_ACCURACY_FILE,
                                   {"round": r + 1, **per_client})
            record["wall_s"] = time.perf_counter() - t0
            log.write(record)
            losses = [x["train_loss"] for x in log.records if x["train_loss"] is not None]
            if not warnings and losses and (warning := divergence_warning(
                    cfg, r + 1, losses[-1], losses[0], exp.num_classes)):
                warnings.append(warning)
                if primary:
                    tqdm.write(warning, file=sys.stderr)
            if cohort.dropped and primary:
                tqdm.write(privacy.truncation_warning(r + 1, cohort), file=sys.stderr)
            bar.update()
            bar.set_postfix(loss=f"{record['train_loss'] or math.nan:.3f}",
                            acc=f"{record.get('eval_accuracy', float('nan')):.3f}")
            if cfg.checkpoint_every and ((r + 1) % cfg.checkpoint_every == 0
                                         or r + 1 == cfg.rounds):
                ckpt.save(r + 1, saved_state(mask, state), store and store.states)
        ckpt.wait()
    finally:
        feeder.close()
        bar.close()
        log.close()
        ckpt.close()
    final = summarize(log.records, cfg)
    final.update(setup_s=setup_s, params_sha256=params_digest(state.params),
                 client_state_sha256=store and params_digest(store.states),
                 num_clients=exp.num_clients, data_source=exp.source,
                 train_examples=int(exp.partition.sizes.sum()),
                 test_examples=int(len(exp.test["label"])), steps_per_round=exp.steps_per_round,
                 warnings=warnings, **communication(log.records, exp.peft),
                 **privacy.final_record(cfg, log.records))
    if primary:
        write_json(run_dir / "final.json", final)
    return final


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
        "final_train_loss": next((r["train_loss"] for r in reversed(records)
                                  if r["train_loss"] is not None), None),
        "rounds_to_target": target_round,
        "train_wall_s": float(sum(r["wall_s"] for r in records)),
        "skipped_client_updates": int(sum(len(r["skipped_clients"]) for r in records)),
        "config": dataclasses.asdict(cfg),
    }
