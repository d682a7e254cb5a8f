"""The one canonical training loop: rounds, evaluation, metrics, checkpoints, resume.

Rerunning the same command in the same run directory resumes from the last checkpoint;
because data order and client sampling are pure functions of (seed, round), a run killed
and resumed ends bitwise identical to an uninterrupted one. What is written to the run
directory each round lives in `bookkeeping` (shared with vectorized sweeps).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import jax
from tqdm.auto import tqdm

from fedjax_lm.federated.trainable import trainable_part
from fedjax_lm.models import classification_stats
from fedjax_lm.runner import privacy
from fedjax_lm.runner.bookkeeping import (
    RunBook,
    TrainingError,
    check_base_of,
    data_fingerprint,
    divergence_warning,
    nonfinite_server_parts,
    params_digest,
)
from fedjax_lm.runner.checks import from_dict
from fedjax_lm.runner.config import RunConfig
from fedjax_lm.runner.experiment import (
    Experiment,
    build_engine,
    build_experiment,
    client_optimizer,
    round_data,
)
from fedjax_lm.runner.prefetch import RoundFeeder
from fedjax_lm.runner.rundir import check_resumable, locked
from fedjax_lm.scale.distributed import is_primary

__all__ = ["TrainingError", "check_base_of", "data_fingerprint", "divergence_warning",
           "make_predict", "memory_plan_lines", "nonfinite_server_parts", "params_digest",
           "train"]


def make_predict(model):
    """Per-example (correct, nll) for a batch, in eval mode."""

    def predict(params, batch):
        nll, correct = classification_stats(model.apply(params, batch, train=False).logits,
                                            batch["label"])
        return correct, nll

    return jax.jit(predict)


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
    cfg = from_dict(cfg.to_dict())  # built directly or by `replace`: not checked yet
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
    book = RunBook(cfg, exp, state, store, predict=make_predict(exp.model), primary=primary)
    start, state, store = book.start, book.state, book.store
    setup_s = time.perf_counter() - t_setup
    if primary and progress:
        for line in memory_plan_lines(cfg, exp, engine):
            tqdm.write(line)
    if primary:
        for line in privacy.plan(cfg).lines(cfg):
            tqdm.write(line)

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
            cs = store and store.gather(cohort.ids)
            state, metrics, cs = engine.run_round(state, data, client_ids=cohort.ids,
                                                  client_states=cs)
            record = book.record(r, cohort, state, metrics, cs, t0, host_wait_s=host_wait_s)
            bar.update()
            bar.set_postfix(loss=f"{record['train_loss'] or math.nan:.3f}",
                            acc=f"{record.get('eval_accuracy', float('nan')):.3f}")
    finally:
        feeder.close()
        bar.close()
        book.close()
    return book.final(setup_s)
