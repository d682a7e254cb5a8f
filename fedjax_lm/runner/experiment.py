"""From a `RunConfig` to the pieces a run needs: tokenised data split over clients, a model,
its loss, and an engine. Everything here is deterministic in the config's seed."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
import optax

from fedjax_lm import data as fdata
from fedjax_lm import federated as fl
from fedjax_lm import models
from fedjax_lm.federated.fedavg import ClientParamsInit
from fedjax_lm.runner import privacy
from fedjax_lm.runner.config import ConfigError, RunConfig, executor, partition_params
from fedjax_lm.runner.peft import PeftPlan, build_peft, model_overrides
from fedjax_lm.runner.robustness import aggregator

PRESET_PREFIX = models.PRESET_PREFIX


@dataclasses.dataclass
class Experiment:
    cfg: RunConfig
    model: models.Model
    params: Any  # the server's initial params
    train: dict[str, np.ndarray]  # tokenised training examples [N, ...]
    test: dict[str, np.ndarray]  # tokenised global test set [M, ...]
    partition: list[np.ndarray]  # client -> indices into `train`
    test_shards: list[np.ndarray]  # client -> indices into `test` (paper 1: split the same way)
    num_classes: int
    steps_per_round: int  # S: the longest client's local steps (fixed across rounds)
    source: str  # where the data came from, for the record
    peft: PeftPlan  # which parameters train, and what a client sends
    malicious: np.ndarray | None = None  # bool[N]: the attack's clients (fixed for the run)

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
        tokenizer = fdata.load_tokenizer(models.minilm_path())
        try:
            config = models.preset(
                size, cfg.model_type, vocab_size=len(tokenizer), num_labels=num_labels,
                max_position_embeddings=max(512, cfg.max_length), **overrides,
            )
        except ValueError as e:
            raise ConfigError(f"model {cfg.model!r}: {e}") from None
        model = models.Model(config)
        params = jax.jit(model.init)(jax.random.key(cfg.seed))
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


def _partition(cfg: RunConfig, task: fdata.TaskData) -> list[np.ndarray]:
    params = ({"groups": task.train.groups} if cfg.partition == "natural"
              else partition_params(cfg))
    partitioner = fdata.make_partitioner(cfg.partition, **params)
    return [np.asarray(ix) for ix in partitioner(task.train.labels, cfg.clients, cfg.seed)]


def build_experiment(cfg: RunConfig) -> Experiment:
    task = fdata.load_task(
        cfg.task, cfg.data_dir, max_train=cfg.max_train_examples,
        max_test=cfg.max_test_examples, seed=cfg.seed,
        **({"train_file": cfg.train_file, "test_file": cfg.test_file,
            "text_column": cfg.text_column, "label_column": cfg.label_column,
            "num_classes": cfg.num_labels, "label_names": cfg.label_names}
           if cfg.task == "csv" else {}),
    )
    if "label_summary" in task.info:  # the user's own labels: say how they were read, each run
        print(task.info["label_summary"], flush=True)
    if task.modality != "text":
        raise ConfigError(
            f"task {cfg.task!r} is an image task; the fine-tuning runner takes text tasks "
            "(image experiments live in experiments/ — see README)"
        )
    model, params, tokenizer = load_model(cfg, task.num_classes)
    splits = fdata.tokenize_task(task, tokenizer, cfg.max_length)
    train, test = splits["train"].features, splits["test"].features
    partition = _partition(cfg, task)
    shard = len(test["label"]) // cfg.clients
    if shard == 0:
        raise ConfigError(f"the test set ({len(test['label'])} examples) is smaller than "
                          f"the number of clients ({cfg.clients})")
    order = np.random.default_rng((cfg.seed, 1)).permutation(len(test["label"]))
    test_shards = [np.sort(order[c * shard:(c + 1) * shard]) for c in range(cfg.clients)]
    sizes = [len(ix) for ix in partition]
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
        steps_per_round=int(np.max(steps)), source=task.source,
        malicious=(None if cfg.malicious_fraction is None
                   else fl.malicious_clients(cfg.clients, cfg.malicious_fraction, cfg.seed)),
        peft=build_peft(cfg, params, cfg.clients),
    )


def client_optimizer(cfg: RunConfig) -> optax.GradientTransformation:
    return fl.make_client_optimizer(cfg.client_optimizer, cfg.lr, momentum=cfg.momentum,
                                    weight_decay=cfg.weight_decay)


def per_client_heads(model: models.Model, seed: int) -> ClientParamsInit:
    """Paper 1's code: in round 1 every client starts from its own random head, drawn from
    (seed + 1, client id)."""
    key = jax.random.key(seed + 1)
    return lambda params, cid: model.init_head(params, jax.random.fold_in(key, cid))


def build_algorithm(cfg: RunConfig, exp: Experiment) -> fl.Algorithm:
    """The run's algorithm as engine hooks (wrapped in DP-FedAvg when dp_clip is set)."""
    algorithm = _base_algorithm(cfg, exp)
    if privacy.dp_enabled(cfg):
        return fl.dp_fedavg(algorithm, privacy.plan(cfg).mechanism)
    return algorithm


def _base_algorithm(cfg: RunConfig, exp: Experiment) -> fl.Algorithm:
    loss_fn = models.classification_loss(exp.model)
    server = fl.make_server_optimizer(cfg.server_optimizer, cfg.server_lr)
    heads = per_client_heads(exp.model, cfg.seed) if cfg.head_init == "per_client" else None
    if cfg.algorithm == "scaffold":
        cohort = cfg.cohort_size or exp.num_clients
        return fl.scaffold(loss_fn, cfg.lr, server, cohort_fraction=cohort / exp.num_clients,
                           client_params_init=heads)
    return fl.fedavg(loss_fn, client_optimizer(cfg), server, prox_mu=cfg.prox_mu,
                     carry_optimizer_state=cfg.carry_client_state, client_params_init=heads,
                     aggregator=exp.peft.aggregator or aggregator(cfg, exp.malicious),
                     trainable=exp.peft.trainable, client_mask=exp.peft.client_mask)


def build_engine(cfg: RunConfig, exp: Experiment) -> fl.FederatedEngine:
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
