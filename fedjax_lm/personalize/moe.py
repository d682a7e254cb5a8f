"""Paper 2's experiment: local models, FedAvg, fine-tuned FedAvg and the mixture of experts.

    python -m fedjax_lm.personalize.moe --config experiments/moe_cifar10.yaml --out DIR

For every skew (majority p for CIFAR-10, Dirichlet α for text) and seed: partition the pool
into clients with train / validation / test sets, train the global model with FedAvg (sampled
cohorts, opt-out clients excluded, early stopping on mean client validation loss), then on the
evaluation clients train — all clients vmapped together — a local model from scratch, the
fine-tuned global model and the mixture (expert initialised from the fine-tuned model, gate
fresh), each with per-client early stopping. Every model is scored on the client's own test
set (local test) and on a fixed balanced slice of the task's test set (global test).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lm import data as fdata
from fedjax_lm.grid import ConfigError, append_cell, execution_field, resume_grid
from fedjax_lm.personalize import report
from fedjax_lm.personalize.clients import (
    FitConfig,
    Fitter,
    broadcast_clients,
    fit_clients,
    make_eval_fn,
    make_fitter,
)
from fedjax_lm.personalize.config import (
    check_bool,
    check_choice,
    check_int,
    check_list,
    check_number,
    check_seeds,
    check_str,
    load_config,
    need,
)
from fedjax_lm.personalize.fedavg import (
    FedAvgConfig,
    make_fedavg_engine,
    opt_out_clients,
    participants,
    run_fedavg,
)
from fedjax_lm.personalize.mixture import (
    Classifier,
    engine_loss,
    mixture_eval,
    mixture_loss,
    single_eval,
    single_loss,
)

Params = Any
METHODS = ("local", "fedavg", "finetuned", "mixture")
PARTITIONS = ("majority", "dirichlet")


@dataclass(frozen=True)
class MoeConfig:
    """One paper-2 experiment (a grid of skews × seeds)."""

    name: str = execution_field("moe")
    task: str = "cifar10"  # cifar10 or a text task (ag_news, imdb, ...)
    model: str = "lenet"  # lenet | smcn | preset:<size> | minilm
    max_length: int = 64  # text only
    num_clients: int = 100
    train_size: int = 100  # examples per client
    val_size: int = 200
    test_size: int = 200
    partition: str = "majority"  # majority (skew = p) | dirichlet (skew = alpha)
    skews: tuple[float, ...] = (0.2, 0.3, 0.6, 0.7, 0.8, 1.0)
    k: int = 2  # majority classes per client
    # dealt: disjoint classes dealt from a seeded permutation; ordered: the paper's overlapping
    # ordered pairs (i // K, i % K), including the single-class pairs (a, a); needs k = 2.
    majority_pairs: str = "dealt"
    seeds: tuple[int, ...] = (0, 1, 2)
    eval_clients: int = 20
    global_test_per_class: int = 200  # the balanced global test slice
    opt_out_fraction: float = 0.0
    batch_size: int = 10
    eval_batch_size: int = 100
    data_dir: str | None = execution_field(None)
    fedavg: FedAvgConfig = field(default_factory=FedAvgConfig)
    local: FitConfig = field(default_factory=FitConfig)
    finetune: FitConfig = field(default_factory=FitConfig)
    mixture: FitConfig = field(default_factory=FitConfig)


@dataclass(frozen=True)
class Pool:
    """Everything client data is drawn from, plus the fixed balanced global test set."""

    features: dict[str, np.ndarray]  # per-example arrays of the pool
    global_test: dict[str, np.ndarray]
    num_classes: int
    source: str
    tokenizer: Any = None


@dataclass(frozen=True)
class ModelSpec:
    classifier: Classifier
    gate: Classifier
    init_global: Callable[[jax.Array], Params]  # the server's initial model
    init_local: Callable[[jax.Array], Params]  # a local-only model's starting point
    init_gate: Callable[[jax.Array], Params]


@dataclass(frozen=True)
class Methods:
    """Every compiled piece, built once per experiment and reused by all cells."""

    spec: ModelSpec
    engine: Any
    local: Fitter
    finetune: Fitter
    mixture: Fitter
    global_on_clients: Callable  # one model, each client's data
    single_local: Callable  # per-client models, own data
    single_global: Callable  # per-client models, shared global test
    mix_local: Callable
    mix_global: Callable


def build_methods(cfg: MoeConfig, spec: ModelSpec) -> Methods:
    clf, gate = spec.classifier, spec.gate
    loss1, eval1 = single_loss(clf), single_eval(clf)
    mloss, meval = mixture_loss(clf, gate), mixture_eval(clf, gate)
    return Methods(
        spec=spec,
        engine=make_fedavg_engine(engine_loss(clf), cfg.fedavg),
        local=make_fitter(loss1, eval1, cfg.local),
        finetune=make_fitter(loss1, eval1, cfg.finetune),
        mixture=make_fitter(mloss, meval, cfg.mixture),
        global_on_clients=make_eval_fn(eval1, params_axis=None),
        single_local=make_eval_fn(eval1),
        single_global=make_eval_fn(eval1, data_axis=None),
        mix_local=make_eval_fn(meval),
        mix_global=make_eval_fn(meval, data_axis=None),
    )


# ----------------------------------------------------------------------------- data


def balanced_slice(labels: np.ndarray, per_class: int, num_classes: int) -> np.ndarray:
    """The first `per_class` indices of every class (a fixed, seed-free balanced set)."""
    out = []
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)[:per_class]
        if len(idx) < per_class:
            raise ConfigError(f"global_test_per_class must be at most {len(idx)} (class {c}'s "
                              f"test examples), got {per_class}; lower global_test_per_class")
        out.append(idx)
    return np.sort(np.concatenate(out))


def load_pool(cfg: MoeConfig) -> Pool:
    """CIFAR-10: the pool is the train set plus the test images outside the global slice (100
    clients × 500 examples under majority skew need more than 5,000 images of a class for most
    p; the global test images are never in the pool). Text: the train split, tokenised."""
    task = fdata.load_task(cfg.task, cfg.data_dir)
    k = task.num_classes
    gidx = balanced_slice(task.test.labels, cfg.global_test_per_class, k)
    if task.modality == "image":
        rest = np.setdiff1d(np.arange(len(task.test)), gidx)
        train = fdata.image_features(task.train)
        test = fdata.image_features(task.test)
        pool = {key: np.concatenate([train[key], test[key][rest]]) for key in train}
        global_test = {key: v[gidx] for key, v in test.items()}
        return Pool(pool, global_test, k, task.source)
    tokenizer = fdata.load_tokenizer(_tokenizer_path(cfg.model))
    splits = fdata.tokenize_task(task, tokenizer, cfg.max_length)
    global_test = {key: v[gidx] for key, v in splits["test"].features.items()}
    return Pool(dict(splits["train"].features), global_test, k, task.source, tokenizer)


def _tokenizer_path(model: str) -> Any:
    from fedjax_lm import models

    if model.startswith("preset:") or model == "minilm":
        return models.minilm_path()
    return model


def client_splits(cfg: MoeConfig, labels: np.ndarray, skew: float, seed: int):
    """Per-client train/val/test indices into the pool with exactly the configured sizes."""
    total = cfg.train_size + cfg.val_size + cfg.test_size
    if cfg.partition == "majority":
        majors = None
        if cfg.majority_pairs == "ordered":
            majors = fdata.ordered_pairs(cfg.num_clients, int(labels.max()) + 1)
        part = fdata.majority(labels, cfg.num_clients, seed, p=skew, k=cfg.k, client_size=total,
                              majors=majors)
    elif cfg.partition == "dirichlet":
        need = total * cfg.num_clients
        if need > len(labels):
            raise ConfigError(f"{cfg.num_clients} clients × {total} examples (train_size + "
                              f"val_size + test_size) need more than the pool's {len(labels)}; "
                              "lower num_clients or the sizes")
        sub = np.sort(np.random.default_rng((seed, 3)).choice(len(labels), need, replace=False))
        part = [sub[ix] for ix in fdata.dirichlet(labels[sub], cfg.num_clients, seed, alpha=skew)]
    else:
        raise ConfigError(f"partition must be majority or dirichlet, got {cfg.partition!r}")
    return fdata.split_clients(part, cfg.val_size / total, cfg.test_size / total, seed)


# ----------------------------------------------------------------------------- models


def build_models(cfg: MoeConfig, pool: Pool) -> ModelSpec:
    """Expert/global classifier and gate (same architecture, one output) for `cfg.model`."""
    if cfg.model in ("lenet", "smcn"):
        from fedjax_lm.models.cnn import make_cnn_model

        net = make_cnn_model(cfg.model, pool.num_classes)
        gate_net = make_cnn_model(cfg.model, 1)
        clf = Classifier(net.init, lambda p, b, t, r: net.apply(p, b, train=t, rng=r))
        gate = Classifier(gate_net.init, lambda p, b, t, r: gate_net.apply(p, b, train=t, rng=r))
        return ModelSpec(clf, gate, jax.jit(net.init), net.init, gate_net.init)
    from fedjax_lm import models

    if cfg.model.startswith("preset:"):
        config = models.preset(
            cfg.model.removeprefix("preset:"), "bert", vocab_size=len(pool.tokenizer),
            num_labels=pool.num_classes, max_position_embeddings=max(512, cfg.max_length),
        )
        model = models.Model(config)
        init_global = init_local = model.init
        gate_model = models.Model(config.replace(num_labels=1))
        init_gate = gate_model.init
    else:
        loaded = models.from_pretrained(cfg.model, pool.num_classes, load_tokenizer=False)
        model, config = loaded.model, loaded.config
        body = {k: v for k, v in loaded.params.items() if k != "head"}
        gate_model = models.Model(config.replace(num_labels=1))

        def init_global(k: jax.Array) -> Params:
            """The pretrained body with a fresh head (local models start here too)."""
            return model.init_head(body, k)

        def init_gate(k: jax.Array) -> Params:
            """The gate: the same pretrained trunk with a fresh one-unit head."""
            return gate_model.init_head(body, k)

        init_local = init_global

    clf = Classifier(model.init, lambda p, b, t, r: model.apply(p, b, train=t, rng=r).logits)
    gate = Classifier(gate_model.init,
                      lambda p, b, t, r: gate_model.apply(p, b, train=t, rng=r).logits)
    return ModelSpec(clf, gate, init_global, init_local, init_gate)


# ----------------------------------------------------------------------------- one cell


def run_cell(
    cfg: MoeConfig, pool: Pool, meth: Methods, skew: float, seed: int,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """All four methods for one (skew, seed); per-client accuracies of the evaluation clients."""
    t0 = time.perf_counter()
    feats, spec = pool.features, meth.spec
    splits = client_splits(cfg, feats["label"], skew, seed)
    rng = np.random.default_rng((seed, 11))
    eval_ids = np.sort(rng.choice(cfg.num_clients, cfg.eval_clients, replace=False))
    opted_out = opt_out_clients(cfg.num_clients, cfg.opt_out_fraction, seed)
    pool_ids = participants(cfg.num_clients, opted_out)
    ebs = cfg.eval_batch_size

    # FedAvg: only the global model's params go through the engine.
    val_all = fdata.pack_clients_eval(feats, splits.val, ebs, client_ids=pool_ids)

    def mean_client_val_loss(params: Params) -> float:
        return float(jnp.mean(meth.global_on_clients(params, val_all, None)["loss"]))

    init = spec.init_global(jax.random.key(seed))
    fed = run_fedavg(meth.engine, init, feats, splits.train, pool_ids, cfg.fedavg, seed,
                     mean_client_val_loss, log)
    log(f"  fedavg: best round {fed.best_round} of {fed.rounds_run} "
        f"({time.perf_counter() - t0:.0f}s)")

    # Personalisation on the evaluation clients, all vmapped together.
    c = len(eval_ids)
    val = fdata.pack_clients_eval(feats, splits.val, ebs, client_ids=eval_ids)
    local_test = fdata.pack_clients_eval(feats, splits.test, ebs, client_ids=eval_ids)
    global_test = fdata.pack_eval(pool.global_test, ebs)

    def train_data(epoch: int) -> dict[str, np.ndarray]:
        return fdata.pack_clients(feats, splits.train, batch_size=cfg.batch_size, seed=seed,
                                  round_idx=10_000 + epoch, client_ids=eval_ids, num_epochs=1)

    keys = jax.random.split(jax.random.key(seed + 1000), 4 * c).reshape(4, c)
    fits: dict[str, Any] = {}
    fits["local"] = fit_clients(meth.local, jax.vmap(spec.init_local)(keys[0]), train_data, val,
                                keys[1, 0], client_ids=eval_ids)
    fits["finetuned"] = fit_clients(meth.finetune, broadcast_clients(fed.params, c), train_data,
                                    val, keys[1, 1], client_ids=eval_ids)
    personal = {"expert": fits["finetuned"].params, "gate": jax.vmap(spec.init_gate)(keys[2])}
    # The untrained gate's values, so that a gate that never moved is not read as a learned blend.
    gate_init = meth.mix_local(personal, local_test, fed.params)
    fits["mixture"] = fit_clients(meth.mixture, personal, train_data, val, keys[1, 2],
                                  frozen=fed.params, client_ids=eval_ids)

    # Scores: local test (own skewed set) and global test (shared balanced set).
    out: dict[str, Any] = {"skew": skew, "seed": seed, "eval_ids": eval_ids.tolist(),
                           "opted_out_eval": np.isin(eval_ids, opted_out).tolist(),
                           "fedavg_best_round": fed.best_round, "fedavg_rounds": fed.rounds_run,
                           "fedavg_history": fed.history, "methods": {}}
    for method in METHODS:
        if method == "fedavg":
            params, frozen = broadcast_clients(fed.params, c), None
            ev_l, ev_g = meth.single_local, meth.single_global
        elif method == "mixture":
            params, frozen = fits[method].params, fed.params
            ev_l, ev_g = meth.mix_local, meth.mix_global
        else:
            params, frozen = fits[method].params, None
            ev_l, ev_g = meth.single_local, meth.single_global
        lt, gt = ev_l(params, local_test, frozen), ev_g(params, global_test, frozen)
        rec = {"local_acc": np.asarray(lt["accuracy"]).tolist(),
               "global_acc": np.asarray(gt["accuracy"]).tolist()}
        if "gate" in lt:
            rec["gate_local"] = np.asarray(lt["gate"]).tolist()
            rec["gate_global"] = np.asarray(gt["gate"]).tolist()
            rec["gate_var_local"] = np.asarray(lt["gate_var"]).tolist()
            rec["gate_var_global"] = np.asarray(gt["gate_var"]).tolist()
            rec["gate_init_local"] = np.asarray(gate_init["gate"]).tolist()
            rec["gate_init_var_local"] = np.asarray(gate_init["gate_var"]).tolist()
        if method in fits:
            rec["best_epoch"] = fits[method].best_epoch.tolist()
            rec["epochs_run"] = fits[method].epochs_run
        out["methods"][method] = rec
        log(f"  {method:9s} local {np.mean(rec['local_acc']):.3f} "
            f"global {np.mean(rec['global_acc']):.3f}")
    out["wall_s"] = time.perf_counter() - t0
    return out


# ----------------------------------------------------------------------------- driver


def run(cfg: MoeConfig, out_dir: Path, command: str) -> list[dict[str, Any]]:
    """The whole grid; results (csv, table, plot, per-cell json) are rewritten after each cell,
    and finished cells in `out_dir/cells.jsonl` are reused, so a killed run resumes."""
    out_dir.mkdir(parents=True, exist_ok=True)
    log_file = (out_dir / "progress.log").open("a")

    def log(msg: str) -> None:
        print(msg, flush=True)
        log_file.write(msg + "\n")
        log_file.flush()

    t0 = time.perf_counter()
    # Seeds outer: a cut-short run still covers every skew.
    done, todo = resume_grid(out_dir, cfg, {"seed": "seeds", "skew": "skews"})
    pool = load_pool(cfg)
    meth = build_methods(cfg, build_models(cfg, pool))
    log(f"{cfg.name}: pool {len(pool.features['label'])} examples from {pool.source}; "
        f"global test {len(pool.global_test['label'])}")
    for key in todo:
        skew, seed = key["skew"], key["seed"]
        log(f"skew {skew} seed {seed}")
        cell = run_cell(cfg, pool, meth, skew, seed, log)
        done.append(cell)
        append_cell(out_dir, cell)
        report.write_moe(out_dir, done, cfg, command, time.perf_counter() - t0)
    log_file.close()
    return done


def main(argv: list[str] | None = None) -> int:
    """`python -m fedjax_lm.personalize.moe`, the same command as `fedjax-lm moe`: bad input
    is one line and exit status 2 (fedjax_lm.entry)."""
    from fedjax_lm.entry import module_main

    return module_main("python -m fedjax_lm.personalize.moe", __doc__.splitlines()[0],
                       add_arguments, run_from_args, argv)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="experiments/moe_*.yaml")
    parser.add_argument("--out", default=None, help="output dir (default experiments/results/NAME)")
    parser.add_argument("--data-dir", default=None, help="dataset root (else $FEDJAX_LM_DATA_DIR)")
    parser.add_argument("--smoke", action="store_true", help="the config's few-step smoke run")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite table, CSV and plot from the finished cells; no training")


def check_config(cfg: MoeConfig) -> None:
    """Reject settings that would otherwise fail (or silently mean something else) mid-run:
    every field a user sets, before any data is loaded or any model trained."""
    from fedjax_lm.federated import BACKENDS

    check_str("name", cfg.name)
    check_str("task", cfg.task)
    check_str("model", cfg.model)
    check_str("data_dir", cfg.data_dir, optional=True)
    check_int("max_length", cfg.max_length, 2)
    check_int("num_clients", cfg.num_clients)
    # Each size directly: a bad one must be named, not the split fractions made from them.
    for name in ("train_size", "val_size", "test_size"):
        check_int(name, getattr(cfg, name))
    check_choice("partition", cfg.partition, PARTITIONS)
    check_list("skews", cfg.skews, "numbers")
    for skew in cfg.skews:
        if cfg.partition == "majority":
            check_number("skews (majority p)", skew, 0.0, 1.0, high_open=False)
        else:
            check_number("skews (dirichlet alpha)", skew, 0.0, low_open=True)
    check_int("k", cfg.k)
    if cfg.majority_pairs not in ("dealt", "ordered"):
        raise ConfigError(f"majority_pairs must be dealt or ordered, got {cfg.majority_pairs!r}")
    if cfg.majority_pairs == "ordered" and (cfg.partition != "majority" or cfg.k != 2):
        raise ConfigError("majority_pairs: ordered needs partition: majority and k: 2 (the "
                          f"paper's pairs), got partition {cfg.partition!r}, k {cfg.k}")
    check_seeds("seeds", cfg.seeds)
    check_int("eval_clients", cfg.eval_clients)
    need(cfg.eval_clients <= cfg.num_clients,
         f"eval_clients must be at most num_clients={cfg.num_clients}, got "
         f"{cfg.eval_clients}: the evaluation clients are drawn from the population; lower "
         "eval_clients or raise num_clients")
    check_int("global_test_per_class", cfg.global_test_per_class)
    check_number("opt_out_fraction", cfg.opt_out_fraction, 0.0, 1.0)
    check_int("batch_size", cfg.batch_size)
    check_int("eval_batch_size", cfg.eval_batch_size)
    fed = cfg.fedavg
    check_int("fedavg.rounds", fed.rounds)
    check_int("fedavg.cohort_size", fed.cohort_size)
    # Opt-out clients never join a cohort (`opt_out_clients`: round(fraction · N) of them).
    population = cfg.num_clients - int(round(cfg.opt_out_fraction * cfg.num_clients))
    out = cfg.num_clients - population
    need(fed.cohort_size <= population,
         f"fedavg.cohort_size must be at most {population} (num_clients={cfg.num_clients}"
         + (f" less the {out} that opt out" if out else "")
         + f"), got {fed.cohort_size}: a cohort cannot be larger than the population; lower "
         "fedavg.cohort_size or raise num_clients")
    check_int("fedavg.local_epochs", fed.local_epochs)
    check_int("fedavg.batch_size", fed.batch_size)
    check_number("fedavg.lr", fed.lr, 0.0, low_open=True)
    check_int("fedavg.eval_every", fed.eval_every)
    check_int("fedavg.patience", fed.patience)
    check_choice("fedavg.backend", fed.backend, BACKENDS)
    for name in ("local", "finetune", "mixture"):
        fit: FitConfig = getattr(cfg, name)
        check_number(f"{name}.lr", fit.lr, 0.0, low_open=True)
        check_int(f"{name}.max_epochs", fit.max_epochs)
        check_int(f"{name}.patience", fit.patience)
        check_bool(f"{name}.keep_initial", fit.keep_initial)


def run_from_args(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    cfg = load_config(MoeConfig, args.config, smoke=args.smoke)
    check_config(cfg)
    if args.data_dir:
        cfg = dataclasses.replace(cfg, data_dir=args.data_dir)
    out = Path(args.out or f"experiments/results/{cfg.name}")
    command = " ".join(["python -m fedjax_lm.personalize.moe", *(argv or sys.argv[1:])])
    if args.report_only:
        done, _ = resume_grid(out, cfg, {"seed": "seeds", "skew": "skews"})
        command, wall_s = report.finished_run(out, done)
        report.write_moe(out, done, cfg, command, wall_s)
        return 0
    run(cfg, out, command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
