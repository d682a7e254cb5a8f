"""A run config's values checked: each raw value coerced to its field's type, then the whole
config against every rule (and the engine's, data layer's and model's own), so a bad config
fails in `from_dict`, before a run directory exists."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any

from fedjax_lm.grid import ConfigError
from fedjax_lm.runner import privacy
from fedjax_lm.runner.config import FIELDS, HINTS, RunConfig
from fedjax_lm.runner.robustness import check_robustness

CLIENT_OPTIMIZERS = ("sgd", "adam", "adamw")
HEAD_INITS = ("shared", "per_client")
NONFINITE_POLICIES = ("fail", "skip")
DEDUPE_TASKS = ("blog10", "blog50")
SEED_MAX = 2**32 - 2  # jax keys hold 32 bits (2**32 is seed 0 again); runs also use seed + 1


def coerce(name: str, hint: Any, value: Any) -> Any:
    """Convert a YAML / command-line value to field `name`'s declared type `hint`, or explain
    why not."""
    args = typing.get_args(hint)
    optional = isinstance(hint, types.UnionType) and type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if optional else hint
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise ConfigError(f"{name} may not be empty")
    if typing.get_origin(base) is tuple:  # a YAML list, or "a,b,c" from the command line
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list | tuple) or not all(isinstance(i, str | int)
                                                          for i in items):
            raise ConfigError(f"{name} must be a list of names (a,b,c), got {value!r}")
        return tuple(str(i).strip() for i in items)
    if isinstance(value, list | tuple | dict):  # str(value) would pass for any str field
        raise ConfigError(f"{name} must be a single {getattr(base, '__name__', base)}, "
                          f"got {value!r}")
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
                return True
            if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if base is float:
            if isinstance(value, bool):
                raise ValueError
            if not math.isfinite(number := float(value)):  # inf/nan pass every range check
                raise ConfigError(f"{name} must be a finite number, got {value!r}")
            return number
        return str(value)
    except ConfigError:
        raise
    except (TypeError, ValueError):
        raise ConfigError(
            f"{name} must be {getattr(base, '__name__', base)}, got {value!r}"
        ) from None


def from_dict(values: dict[str, Any]) -> RunConfig:
    """Build and validate a config; unknown keys are an error (typos must not pass)."""
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise ConfigError(
            f"unknown config field(s): {', '.join(unknown)}; valid fields: {', '.join(FIELDS)}"
        )
    cfg = RunConfig(**{k: coerce(k, HINTS[k], v) for k, v in values.items()})
    from fedjax_lm.federated.robust import ALIASES  # the pre-issue-17 names, canonicalised

    cfg = dataclasses.replace(cfg, aggregator=ALIASES.get(cfg.aggregator, cfg.aggregator))
    check(cfg)
    return cfg


def check(cfg: RunConfig) -> None:
    """Every rule a config must pass before any work starts (one ConfigError naming the fix)."""

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(msg)

    need(cfg.clients >= 1, f"clients must be >= 1, got {cfg.clients}")
    need(cfg.cohort_size is None or 1 <= cfg.cohort_size <= cfg.clients,
         f"cohort_size must be in [1, clients={cfg.clients}], got {cfg.cohort_size}: a cohort "
         "cannot be larger than the population; lower --cohort-size or raise --clients")
    need(cfg.rounds >= 1, f"rounds must be >= 1, got {cfg.rounds}")
    need(cfg.holdout_clients >= 0, f"holdout_clients must be >= 0, got {cfg.holdout_clients}")
    need(cfg.eval_clients is None or cfg.eval_clients >= 1,
         f"eval_clients must be >= 1 (or unset), got {cfg.eval_clients}")
    need(cfg.holdout_clients == 0 or cfg.eval_clients is not None,
         "holdout_clients are evaluated by --eval-clients K (a sample of K held-out and K "
         "training clients each eval round): add --eval-clients")
    need(not cfg.dedupe or cfg.task in DEDUPE_TASKS,
         f"dedupe applies to {', '.join(DEDUPE_TASKS)} (texts posted under several authors), "
         f"not task {cfg.task!r}: drop --dedupe")
    need(cfg.batch_size >= 1, f"batch_size must be >= 1, got {cfg.batch_size}")
    need(cfg.max_length >= 2, f"max_length must be >= 2, got {cfg.max_length}")
    need((cfg.local_epochs is None) != (cfg.local_steps is None),
         "set exactly one of local_epochs / local_steps "
         f"(got local_epochs={cfg.local_epochs}, local_steps={cfg.local_steps})")
    need(cfg.local_epochs is None or cfg.local_epochs >= 1, "local_epochs must be >= 1")
    need(cfg.local_steps is None or cfg.local_steps >= 1, "local_steps must be >= 1")
    need(cfg.lr > 0, f"lr must be > 0, got {cfg.lr}")
    need(cfg.server_lr > 0, f"server_lr must be > 0, got {cfg.server_lr}")
    need(cfg.prox_mu >= 0, f"prox_mu must be >= 0, got {cfg.prox_mu}")
    need(cfg.alpha > 0, f"alpha must be > 0, got {cfg.alpha}")
    need(0.0 <= cfg.p <= 1.0, f"p must be in [0, 1], got {cfg.p}")
    need(cfg.eval_every >= 1, "eval_every must be >= 1")
    need(cfg.checkpoint_every >= 0, "checkpoint_every must be >= 0 (0 = never)")
    need(cfg.client_optimizer in CLIENT_OPTIMIZERS,
         f"client_optimizer must be one of {CLIENT_OPTIMIZERS}, got {cfg.client_optimizer!r}")
    need(cfg.head_init in HEAD_INITS, f"head_init must be one of {HEAD_INITS}")
    need(cfg.head_init == "shared" or (cfg.server_optimizer == "fedavg" and cfg.server_lr == 1
                                       and not cfg.carry_client_state),
         "head_init=per_client reproduces paper 1's code: it needs plain FedAvg "
         "(server_optimizer=fedavg, server_lr=1) and no carried client state")
    need(cfg.nonfinite in NONFINITE_POLICIES, f"nonfinite must be one of {NONFINITE_POLICIES}")
    need(cfg.target_accuracy is None or 0 < cfg.target_accuracy <= 1,
         "target_accuracy must be in (0, 1]")
    # Names and execution fields are checked by the layers that own them, once.
    from fedjax_lm import federated as fl

    need(cfg.algorithm in fl.ALGORITHMS,
         f"unknown algorithm {cfg.algorithm!r}; choose one of {', '.join(fl.ALGORITHMS)}")
    need(cfg.algorithm != "fedprox" or cfg.prox_mu > 0,
         "algorithm fedprox needs prox_mu > 0 (e.g. --prox-mu 0.01)")
    need(cfg.algorithm != "scaffold" or (cfg.client_optimizer == "sgd" and not cfg.momentum
                                         and not cfg.prox_mu and not cfg.carry_client_state),
         "algorithm scaffold runs plain local SGD with its own client state: set "
         "client_optimizer=sgd, momentum=0, prox_mu=0 and carry_client_state=false")
    need(cfg.server_optimizer in fl.SERVER_OPTIMIZERS,
         f"server_optimizer must be one of {fl.SERVER_OPTIMIZERS}, got {cfg.server_optimizer!r}")
    need(cfg.weighting in fl.WEIGHTINGS, f"weighting must be one of {fl.WEIGHTINGS}")
    try:
        execution = executor(cfg)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    check_robustness(cfg, execution)
    default_aggregator = next(f.default for f in dataclasses.fields(cfg) if f.name == "aggregator")
    privacy.check(cfg, default_aggregator)
    from fedjax_lm.data import PARTITIONERS, TASKS

    need(cfg.task in TASKS, f"unknown task {cfg.task!r}; valid tasks: {', '.join(sorted(TASKS))}")
    need(cfg.partition in PARTITIONERS,
         f"unknown partition {cfg.partition!r}; valid: {', '.join(sorted(PARTITIONERS))}")
    need(cfg.task != "csv" or cfg.train_file is not None, "task csv needs --train-file")
    from fedjax_lm.runner.peft import check_peft

    check_peft(cfg)
    _check_inputs(cfg)


def _check_inputs(cfg: RunConfig) -> None:
    """Values that would otherwise fail (or not fail) only deep inside data, model or partition
    code, after a run directory exists: refused here, naming the flag and what it takes."""

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(msg)

    need(0 <= cfg.seed <= SEED_MAX, f"seed must be in [0, {SEED_MAX}], got {cfg.seed}")
    need(cfg.eval_batch_size >= 1, f"eval_batch_size must be >= 1, got {cfg.eval_batch_size}")
    for name in ("max_train_examples", "max_test_examples"):
        value = getattr(cfg, name)
        need(value is None or value >= 1, f"{name} must be >= 1 (or unset), got {value}")
    # -- the csv task's classes
    if cfg.task != "csv":
        need(cfg.num_labels is None and cfg.label_names is None,
             f"num_labels / label_names pin the classes of task csv; task {cfg.task!r} has its "
             "own: unset them")
    need(cfg.num_labels is None or cfg.num_labels >= 2,
         f"num_labels must be >= 2, got {cfg.num_labels}")
    names = cfg.label_names
    need(names is None or (len(names) >= 2 and all(names) and len(set(names)) == len(names)),
         f"label_names must be 2 or more distinct names, got {names}")
    need(names is None or cfg.num_labels is None or cfg.num_labels == len(names),
         f"num_labels={cfg.num_labels} but label_names has {len(names or ())} names")
    # -- the model
    from fedjax_lm.models.config import MODEL_TYPES, POOLINGS, PRESETS
    from fedjax_lm.models.hidden_act import hidden_act_names
    from fedjax_lm.models.pretrained import PRESET_PREFIX

    if cfg.model.startswith(PRESET_PREFIX):
        size = cfg.model[len(PRESET_PREFIX):]
        need(size in PRESETS, f"unknown model preset {size!r}; valid: "
                              f"{', '.join(PRESET_PREFIX + p for p in PRESETS)}")
    elif cfg.model in PRESETS and not Path(cfg.model).expanduser().exists():
        raise ConfigError(f"model {cfg.model!r} is neither a folder nor a named model; for the "
                          f"randomly initialised {cfg.model} size use --model "
                          f"{PRESET_PREFIX}{cfg.model}")
    need(cfg.model_type in MODEL_TYPES,
         f"model_type must be one of {', '.join(MODEL_TYPES)}, got {cfg.model_type!r}")
    need(cfg.pooling in POOLINGS,
         f"pooling must be one of {', '.join(POOLINGS)}, got {cfg.pooling!r}")
    need(cfg.hidden_act is None or cfg.hidden_act in hidden_act_names(),
         f"unknown hidden_act {cfg.hidden_act!r}; valid: {', '.join(hidden_act_names())}")
    # -- the partition, by the data layer's own rules
    from fedjax_lm.data import TASKS, DataError, make_partitioner

    if cfg.partition == "natural":
        need(cfg.task not in TASKS or TASKS[cfg.task].groups,
             f"partition natural needs a task whose examples have natural clients (authors): "
             f"{', '.join(t for t, spec in TASKS.items() if spec.groups)}; task {cfg.task!r} "
             "has none: use another partition (iid, dirichlet, ...)")
    else:
        try:
            make_partitioner(cfg.partition, **partition_params(cfg))
        except DataError as e:
            raise ConfigError(str(e)) from None


# The config fields each partitioner reads (the others read none of them).
PARTITION_FIELDS = {"dirichlet": ("alpha",), "majority": ("p", "k"), "quantity_skew": ("beta",)}


def partition_params(cfg: RunConfig) -> dict[str, Any]:
    """The partitioner's parameters from the config (all but `natural`'s per-example groups)."""
    return {name: getattr(cfg, name) for name in PARTITION_FIELDS.get(cfg.partition, ())}


# The config fields each aggregator reads (the others read none of them).
AGGREGATOR_FIELDS = {"trimmed_mean": ("trim_fraction",), "norm_bound": ("norm_bound",),
                     "krum": ("byzantine",), "multi_krum": ("byzantine", "multi_krum_m")}


def unused_fields(cfg: RunConfig) -> dict[str, str]:
    """Fields whose value changes nothing this run computes — the other partitions' and
    aggregators' parameters — each with the settings that read it ("--partition dirichlet")."""
    out = {}
    for setting, table in (("partition", PARTITION_FIELDS), ("aggregator", AGGREGATOR_FIELDS)):
        used = set(table.get(getattr(cfg, setting), ()))
        for name in {n for names in table.values() for n in names} - used:
            owners = [owner for owner, names in table.items() if name in names]
            out[name] = f"--{setting} {' or '.join(owners)}"
    return out


def unused_message(cfg: RunConfig, names: list[str], *, as_flags: bool = False) -> str:
    """Why `names` change nothing here: "alpha is read by --partition dirichlet, not by
    --partition iid" (`as_flags`: "--alpha is ...")."""
    unused = unused_fields(cfg)
    parts = []
    for name in names:
        setting = unused[name].split()[0][2:]
        shown = f"--{name.replace('_', '-')}" if as_flags else name
        parts.append(f"{shown} is read by {unused[name]}, not by --{setting} "
                     f"{getattr(cfg, setting)}")
    return "; ".join(parts)


def check_given_used(cfg: RunConfig, given: list[str]) -> None:
    """Refuse fields given on the command line that this run never reads (`--trim-fraction`
    with `--aggregator mean`): the user meant another setting. A preset's base may set them
    for the sweep cells that read them."""
    idle = [name for name in given if name in unused_fields(cfg)]
    if idle:
        it = "it" if len(idle) == 1 else "them"
        raise ConfigError(f"{unused_message(cfg, idle, as_flags=True)}: drop {it} or set what "
                          f"reads {it}")


def executor(cfg: RunConfig):
    """The run's executor config (validated by the engine's own rules)."""
    from fedjax_lm.federated import ExecutorConfig

    return ExecutorConfig(backend=cfg.backend, clients_per_chunk=cfg.clients_per_chunk,
                          chunk_executor=cfg.chunk_executor)
