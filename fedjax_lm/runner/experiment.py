"""From a `RunConfig` to the pieces a run needs: tokenised data split over clients, a model,
its loss, and an engine. Everything here is deterministic in the config's seed."""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, NamedTuple

import jax
import numpy as np
import optax

from fedjax_lm import data as fdata
from fedjax_lm import federated as fl
from fedjax_lm import models
from fedjax_lm.federated.fedavg import ClientParamsInit
from fedjax_lm.federated.trainable import trainable_part
from fedjax_lm.grid import ConfigError
from fedjax_lm.runner import privacy
from fedjax_lm.runner.checks import executor, partition_params
from fedjax_lm.runner.config import RunConfig
from fedjax_lm.runner.peft import PeftPlan, build_peft, model_overrides
from fedjax_lm.runner.robustness import aggregator

PRESET_PREFIX = models.PRESET_PREFIX


@dataclasses.dataclass
class Experiment:
    cfg: RunConfig
    model: models.Model
    params: Any  # the server's initial params
    train: dict[str, np.ndarray]  # tokenised training examples [N, ...] (memory-mapped store)
    test: dict[str, np.ndarray]  # tokenised global test set [M, ...]
    partition: fdata.ClientIndex  # client -> indices into `train`
    # client -> indices into `test` (paper 1: split the same way); empty when the population
    # outnumbers the test examples (then the global test set is evaluated whole, unsharded)
    test_shards: fdata.ClientIndex
    num_classes: int
    steps_per_round: int  # S: the longest client's local steps (fixed across rounds)
    source: str  # where the data came from, for the record
    peft: PeftPlan  # which parameters train, and what a client sends
    malicious: np.ndarray | None = None  # bool[N]: the attack's clients (fixed for the run)
    # held-out clients (`holdout_clients`): partitioned with the population, never trained on
    heldout: fdata.ClientIndex | None = None

    @property
    def num_clients(self) -> int:
        return len(self.partition)


def load_model(cfg: RunConfig, num_labels: int) -> tuple[models.Model, Any, Any]:
    """(model, initial params, tokenizer) for `cfg.model`.

    `preset:<size>` builds a randomly initialised encoder of that size with the MiniLM
    tokenizer's vocabulary (offline); anything else goes through `from_pretrained`.
    """
    overrides: dict[str, Any] = {"attend_to_padding": cfg.attend_to_padding,
                                 "pooling": cfg.pooling, **model_overrides(cfg)}
    if cfg.hidden_act:
        overrides["hidden_act"] = cfg.hidden_act
    if cfg.model.startswith(PRESET_PREFIX):
        size = cfg.model[len(PRESET_PREFIX):]
        tokenizer = _preset_tokenizer()
        try:
            config = models.preset(
                size, cfg.model_type, vocab_size=len(tokenizer), num_labels=num_labels,
                max_position_embeddings=max(512, cfg.max_length), **overrides,
            )
        except ValueError as e:
            raise ConfigError(f"model {cfg.model!r}: {e}") from None
        model = models.Model(config)
        params = _init_program(config)(jax.random.key(cfg.seed))
        return model, params, tokenizer
    loaded = models.from_pretrained(cfg.model, num_labels, head_seed=cfg.seed, **overrides)
    if loaded.tokenizer is None:
        raise ConfigError(f"model {cfg.model!r} ships no tokenizer files")
    if len(loaded.tokenizer) > loaded.config.vocab_size:  # jax would clamp the lookups silently
        raise ConfigError(f"model {cfg.model!r}: its tokenizer has {len(loaded.tokenizer)} "
                          f"tokens but the model only {loaded.config.vocab_size} embeddings; "
                          "use the tokenizer the model was trained with")
    if cfg.max_length > loaded.config.max_position_embeddings:
        raise ConfigError(f"max_length {cfg.max_length} exceeds model {cfg.model!r}'s "
                          f"{loaded.config.max_position_embeddings} positions; use --max-length "
                          f"{loaded.config.max_position_embeddings} or less")
    return loaded.model, loaded.params, loaded.tokenizer


@functools.lru_cache(maxsize=8)
def _init_program(config: models.EncoderConfig):
    """One compiled initialiser per model config: the cells of a sweep (seeds) share it."""
    return jax.jit(models.Model(config).init)


@functools.lru_cache(maxsize=1)
def _preset_tokenizer():
    return fdata.load_tokenizer(models.minilm_path())


def _partition(cfg: RunConfig, task: fdata.TaskData
               ) -> tuple[fdata.ClientIndex, fdata.ClientIndex | None]:
    """(training clients, held-out clients or None). With `holdout_clients` H the population is
    partitioned into clients + H and a seeded random H of them are held out (never trained)."""
    if cfg.partition == "natural":  # one client per author: the data sets the count
        authors = len(np.unique(task.train.groups))
        if authors != cfg.clients + cfg.holdout_clients:
            held = f" + {cfg.holdout_clients} held out" if cfg.holdout_clients else ""
            sample = (f" (a --max-train-examples {cfg.max_train_examples} subsample: a "
                      "larger one may keep more authors)" if cfg.max_train_examples else "")
            raise ConfigError(
                f"partition natural makes one client per author: the {len(task.train)} "
                f"training examples{sample} hold {authors} authors, not {cfg.clients} "
                f"clients{held}; " + (f"set --clients {authors - cfg.holdout_clients}"
                                      if authors > cfg.holdout_clients
                                      else "lower --holdout-clients"))
    params = ({"groups": task.train.groups} if cfg.partition == "natural"
              else partition_params(cfg))
    partitioner = fdata.make_partitioner(cfg.partition, **params)
    index = partitioner(task.train.labels, cfg.clients + cfg.holdout_clients, cfg.seed)
    if not cfg.holdout_clients:
        return index, None
    held = np.sort(np.random.default_rng((cfg.seed, 3)).choice(
        len(index), cfg.holdout_clients, replace=False))
    training, heldout = index.select(np.setdiff1d(np.arange(len(index)), held)), index.select(held)
    seen = set(np.unique(task.train.labels[training.order]).tolist())
    unseen = [c for c in range(len(heldout)) if not seen & set(
        task.train.labels[heldout.order[heldout.offsets[c]:heldout.offsets[c + 1]]].tolist())]
    if unseen:  # their accuracy is 0 by construction, not a measure of generalisation
        raise ConfigError(
            f"{len(unseen)} of the {cfg.holdout_clients} held-out clients hold only classes no "
            f"training client has (partition {cfg.partition}), so their accuracy is 0 by "
            "construction; drop --holdout-clients or use another partition")
    return training, heldout


def _test_shards(cfg: RunConfig, num_test: int) -> fdata.ClientIndex:
    """Paper 1 splits the test set like the training set, one shard per client; a population
    with more clients than test examples gets none (the test set is evaluated unsharded)."""
    shard = num_test // cfg.clients
    if shard == 0:
        return fdata.ClientIndex(np.zeros(0, np.int64), np.zeros(1, np.int64))
    order = np.random.default_rng((cfg.seed, 1)).permutation(num_test)
    body = np.sort(order[: shard * cfg.clients].reshape(cfg.clients, shard), axis=1)
    return fdata.ClientIndex(body.reshape(-1), np.arange(cfg.clients + 1, dtype=np.int64) * shard)


def build_experiment(cfg: RunConfig) -> Experiment:
    task = fdata.load_task(
        cfg.task, cfg.data_dir, max_train=cfg.max_train_examples,
        max_test=cfg.max_test_examples, seed=cfg.seed,
        **({"dedupe": True} if cfg.dedupe else {}),
        **({"train_file": cfg.train_file, "test_file": cfg.test_file,
            "text_column": cfg.text_column, "label_column": cfg.label_column,
            "num_classes": cfg.num_labels, "label_names": cfg.label_names}
           if cfg.task == "csv" else {}),
    )
    if cfg.dedupe:
        print(f"{cfg.task}: dropped {task.info['duplicates_dropped']} posts whose text occurs "
              "more than once (dedupe)", flush=True)
    if "label_summary" in task.info:  # the user's own labels: say how they were read, each run
        print(task.info["label_summary"], flush=True)
    if task.modality != "text":
        raise ConfigError(
            f"task {cfg.task!r} is an image task; the fine-tuning runner takes text tasks "
            "(image experiments live in experiments/ — see README)"
        )
    if len(task.test.labels) < task.num_classes:  # an untrained model can score 100 % there
        raise ConfigError(
            f"the test split holds {len(task.test.labels)} example(s), fewer than the "
            f"{task.num_classes} classes of task {cfg.task!r}: its accuracy cannot tell a trained "
            f"model from an untrained one; raise --max-test-examples (e.g. "
            f"{20 * task.num_classes})")
    model, params, tokenizer = load_model(cfg, task.num_classes)
    splits = fdata.tokenize_task(task, tokenizer, cfg.max_length)
    train, test = splits["train"].features, splits["test"].features
    partition, heldout = _partition(cfg, task)
    test_shards = _test_shards(cfg, len(test["label"]))
    if not len(test_shards):
        print(f"the test set ({len(test['label'])} examples) is smaller than the population "
              f"({cfg.clients} clients): it is evaluated whole, without per-client shards "
              "(--eval-clients K samples per-client accuracies on the clients' own data)",
              flush=True)
    sizes = partition.sizes
    steps = fdata.steps_per_client(
        sizes, cfg.batch_size, num_epochs=cfg.local_epochs, num_steps=cfg.local_steps,
        drop_last=cfg.drop_last,
    )
    if int(np.max(steps)) == 0:
        raise ConfigError(
            f"no client has a full batch: client sizes {min(sizes)}..{max(sizes)} with "
            f"batch_size={cfg.batch_size} and drop_last; use more data or a smaller batch"
        )
    return Experiment(
        cfg=cfg, model=model, params=params, train=train, test=test, partition=partition,
        test_shards=test_shards, num_classes=task.num_classes,
        steps_per_round=int(np.max(steps)), source=task.source, heldout=heldout,
        malicious=(None if cfg.malicious_fraction is None
                   else fl.malicious_clients(cfg.clients, cfg.malicious_fraction, cfg.seed)),
        peft=build_peft(cfg, params, cfg.clients),
    )


def client_optimizer(cfg: RunConfig, lr: Any = None) -> optax.GradientTransformation:
    return fl.make_client_optimizer(cfg.client_optimizer, cfg.lr if lr is None else lr,
                                    momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def head_key(seed: int) -> jax.Array:
    return jax.random.key(seed + 1)


def per_client_heads(model: models.Model, seed: int, key: jax.Array | None = None
                     ) -> ClientParamsInit:
    """Paper 1's code: in round 1 every client starts from its own random head, drawn from
    (seed + 1, client id) (`key`: that key, given as an array, e.g. traced)."""
    key = head_key(seed) if key is None else key
    return lambda params, cid: model.init_head(params, jax.random.fold_in(key, cid))


class Hypers(NamedTuple):
    """What may differ between the federations of one vectorized program: arrays that the
    algorithm reads at run time instead of constants baked into its program."""

    lr: Any  # float32 client learning rate
    server_lr: Any  # float32 (read only by a server optimizer other than fedavg)
    head_key: Any  # key(seed + 1) for paper 1's per-client heads


def hypers(cfg: RunConfig) -> Hypers:
    return Hypers(np.float32(cfg.lr), np.float32(cfg.server_lr), head_key(cfg.seed))


def build_algorithm(cfg: RunConfig, exp: Experiment, hp: Hypers | None = None) -> fl.Algorithm:
    """The run's algorithm as engine hooks (wrapped in DP-FedAvg when dp_clip is set); `hp`
    replaces the config's learning rates and head key by (traced) arrays."""
    algorithm = _base_algorithm(cfg, exp, hp)
    if privacy.dp_enabled(cfg):
        return fl.dp_fedavg(algorithm, privacy.plan(cfg).mechanism)
    return algorithm


def _base_algorithm(cfg: RunConfig, exp: Experiment, hp: Hypers | None) -> fl.Algorithm:
    loss_fn = models.classification_loss(exp.model)
    # Plain FedAvg's server_lr picks the optimizer's structure (1: none), so it stays a constant.
    traced_server_lr = hp is not None and cfg.server_optimizer != "fedavg"
    server = fl.make_server_optimizer(cfg.server_optimizer,
                                      hp.server_lr if traced_server_lr else cfg.server_lr)
    heads = (per_client_heads(exp.model, cfg.seed, hp and hp.head_key)
             if cfg.head_init == "per_client" else None)
    lr = cfg.lr if hp is None else hp.lr
    if cfg.algorithm == "scaffold":
        cohort = cfg.cohort_size or exp.num_clients
        return fl.scaffold(loss_fn, lr, server, cohort_fraction=cohort / exp.num_clients,
                           client_params_init=heads)
    return fl.fedavg(loss_fn, client_optimizer(cfg, lr), server, prox_mu=cfg.prox_mu,
                     carry_optimizer_state=cfg.carry_client_state, client_params_init=heads,
                     aggregator=exp.peft.aggregator or aggregator(cfg, exp.malicious),
                     trainable=exp.peft.trainable, client_mask=exp.peft.client_mask)


# A vmapped round holds every client's copy of the trainable parameters several times over
# (params, gradient, delta, optimizer state, the running sum: measured 5.5 copies of the tiny
# preset's 8 MB on a CPU). Unchunked, a cohort of 500 such clients peaked at 15 GiB of RAM; on a
# CPU host a cohort whose estimate exceeds a quarter of the machine's memory runs in chunks
# instead (same math, the sum taken chunk by chunk; --clients-per-chunk overrides). Cohorts
# that fit run unchunked as before.
CLIENT_STATE_COPIES = 6


def host_client_budget() -> int:
    """Bytes of client state a CPU round may hold at once: a quarter of RAM, at least 2 GiB."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 8 * 2**30
    return max(2 * 2**30, total // 4)


def auto_chunk(cfg: RunConfig, exp: Experiment) -> int | None:
    """Clients per chunk for a CPU round whose unchunked client state would exceed the budget,
    else None (chunking set by the user, another backend, or a cohort that fits)."""
    if cfg.clients_per_chunk is not None or cfg.backend != "vmap" or (
            jax.default_backend() != "cpu"):
        return None
    trainable = trainable_part(exp.peft.trainable, exp.params)
    per_client = CLIENT_STATE_COPIES * sum(
        int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(trainable))
    cohort = (privacy.plan(cfg).max_cohort if cfg.sampling == "poisson"
              else privacy.expected_clients(cfg))
    if cohort * per_client <= host_client_budget():
        return None
    return max(1, host_client_budget() // per_client)


def build_engine(cfg: RunConfig, exp: Experiment) -> fl.FederatedEngine:
    width = auto_chunk(cfg, exp)
    if width is not None:
        chunked = dataclasses.replace(executor(cfg), clients_per_chunk=width)
        try:
            engine = fl.FederatedEngine(build_algorithm(cfg, exp), chunked,
                                        weighting=cfg.weighting)
        except ValueError:  # an aggregator that needs the whole cohort at once: unchunked
            pass
        else:
            print(f"memory: a cohort of {privacy.expected_clients(cfg)} clients unchunked would "
                  f"hold over {host_client_budget() / 2**30:.0f} GiB of client state; running "
                  f"it in chunks of {width} (set --clients-per-chunk to choose)", flush=True)
            return engine
    return fl.FederatedEngine(build_algorithm(cfg, exp), executor(cfg), weighting=cfg.weighting)


def round_data(cfg: RunConfig, exp: Experiment, round_index: int, ids: np.ndarray) -> dict:
    """The cohort's [C, S, B, ...] arrays for one round (reshuffled from (seed, round))."""
    data = fdata.pack_clients(
        exp.train, exp.partition, batch_size=cfg.batch_size, seed=cfg.seed,
        round_idx=round_index, client_ids=ids, num_epochs=cfg.local_epochs,
        num_steps=cfg.local_steps, drop_last=cfg.drop_last, pad_steps_to=exp.steps_per_round,
    )
    if cfg.attack == "label_flip":  # the malicious clients train on flipped labels
        bad = exp.malicious[np.asarray(ids)]
        data["label"] = np.where(bad.reshape((-1,) + (1,) * (data["label"].ndim - 1)),
                                 fl.flip_labels(data["label"], exp.num_classes), data["label"])
    return data
