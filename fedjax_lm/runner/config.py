"""Typed run configuration: YAML presets + command-line overrides → one frozen `RunConfig`.

Every field that varies between runs lives here, so a run directory's `config.yaml` is
enough to reproduce or resume the run. Bad configs fail here, before any work starts.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from fedjax_lm.grid import (
    ConfigError,
    check_keys,
    execution_field,
    execution_fields,
    expand_grid,
    load_yaml,
    require_mapping,
)

CLIENT_OPTIMIZERS = ("sgd", "adam", "adamw")
HEAD_INITS = ("shared", "per_client")
NONFINITE_POLICIES = ("fail", "skip")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """One federated fine-tuning run (one cell of a sweep)."""

    # -- data
    task: str = "synthetic"
    data_dir: str | None = execution_field(None)  # else $FEDJAX_LM_DATA_DIR, else the hub
    train_file: str | None = None  # task "csv": the user's own data
    test_file: str | None = None
    text_column: str = "text"
    label_column: str = "label"
    num_labels: int | None = None  # task csv: pin the classes 0..K-1 (else: the labels' set)
    label_names: tuple[str, ...] | None = None  # task csv: pin class names and order (a,b,c)
    max_train_examples: int | None = None  # seeded subset, for CPU-scale runs
    max_test_examples: int | None = None
    max_length: int = 128
    # -- model
    model: str = "minilm"  # minilm | minilm-distil | local folder | hub id | preset:<tiny|mini|…>
    model_type: str = "bert"  # for preset:<size> models: bert | distilbert | albert
    head_init: str = "shared"  # shared: server inits the head; per_client: paper 1's code
    attend_to_padding: bool = False  # paper 1's code passed no attention mask
    hidden_act: str | None = None  # override the FFN activation (e.g. abu_n)
    pooling: str = "cls"  # what the head reads: cls ([CLS] + pooler) | mean (masked token mean)
    # -- federation
    clients: int = 4
    cohort_size: int | None = None  # clients per round; None = all
    partition: str = "iid"
    alpha: float = 1.0  # dirichlet concentration
    p: float = 0.8  # majority fraction
    k: int = 2  # majority classes
    beta: float = 1.0  # quantity_skew concentration
    rounds: int = 3
    local_epochs: int | None = 2
    local_steps: int | None = None  # set to use S local steps instead of epochs
    batch_size: int = 32
    drop_last: bool = True
    client_optimizer: str = "sgd"
    lr: float = 2e-5
    momentum: float = 0.0
    weight_decay: float = 0.0
    server_optimizer: str = "fedavg"
    server_lr: float = 1.0
    prox_mu: float = 0.0
    algorithm: str = "fedavg"  # fedavg | fedprox (needs prox_mu > 0) | scaffold (plain SGD)
    aggregator: str = "mean"  # mean | median | trimmed_mean | norm_bound | krum | multi_krum |
    # geometric_median (all but mean / norm_bound need the whole cohort: no clients_per_chunk)
    weighting: str = "examples"
    carry_client_state: bool = False
    # -- robust aggregation and attacks (see fedjax_lm/federated/robust.py, attacks.py)
    trim_fraction: float = 0.1  # trimmed_mean: drop this fraction at each end per coordinate
    norm_bound: float | None = None  # norm_bound: the L2 bound on each client's delta
    byzantine: int = 0  # krum / multi_krum: the assumed malicious clients per cohort, f
    multi_krum_m: int | None = None  # multi_krum: clients averaged (default: live − f)
    attack: str | None = None  # none | sign_flip | scale | gaussian | label_flip | alie
    malicious_fraction: float | None = None  # of the population, seeded from `seed`
    attack_scale: float = 10.0  # scale: the malicious delta's factor
    attack_std: float = 1.0  # gaussian: the malicious delta's per-coordinate std
    # -- parameter-efficient fine-tuning (see runner/peft.py; lora_* need peft=lora)
    peft: str | None = None  # none (= null) | lora | head | bitfit (the head always trains)
    lora_rank: int | None = None  # R (default 8; with lora_ranks: their maximum)
    lora_alpha: float | None = None  # scale alpha / R (default 16)
    lora_dropout: float | None = None  # dropout on the adapters' input (default 0)
    lora_targets: tuple[str, ...] | None = None  # default query,value
    lora_aggregation: str | None = None  # fedit (default) | ffa | exact
    lora_ranks: tuple[str, ...] | None = None  # per-client ranks: 2,4,8 (client i: [i mod len]),
    # tiers 2:0.5,4:0.3,8:0.2 or uniform:2,8 (exact tier sizes, placed by the seed)
    freeze_layers: int = 0  # embeddings and the bottom N (stored) layers frozen
    # -- sampling and differential privacy (user-level DP-FedAvg, on when dp_clip is set)
    # fixed: cohort_size clients without replacement; poisson: each client joins with
    # probability cohort_size/clients, the cohort padded to max_cohort_size (None: a tail bound)
    sampling: str = "fixed"
    max_cohort_size: int | None = None
    dp_clip: float | None = None  # L2 bound on each client's model delta (initial if adaptive)
    dp_clip_per_layer: bool = False  # each leaf to dp_clip/sqrt(leaves) instead of the whole
    dp_noise_multiplier: float | None = None  # z: noise std z*clip on the sum (None: 0)
    target_epsilon: float | None = None  # calibrate z for rounds, sampling and dp_delta
    dp_delta: float | None = None  # None: 1/clients^1.1 (printed)
    dp_accountant: str = "rdp"  # rdp | pld (dp-accounting)
    dp_clip_quantile: float | None = None  # adaptive clipping toward this quantile of norms
    dp_clip_lr: float = 0.2  # adaptive clipping's geometric step (Andrew et al. 2021)
    dp_count_stddev: float | None = None  # noise std of the clipped count (None: 5% of cohort)
    # -- execution
    backend: str = execution_field("vmap")  # backends agree to float tolerance
    clients_per_chunk: int | None = execution_field(None)
    # scan: the chunks run inside the one compiled round (on a CPU, chunks of 1 at MiniLM size
    # are fastest); host: one compiled chunk step serves every cohort size (sweeps over C).
    chunk_executor: str = execution_field("scan")
    # -- run
    seed: int = 0
    eval_every: int = 1
    eval_batch_size: int = execution_field(64)
    checkpoint_every: int = execution_field(1)
    nonfinite: str = "fail"  # fail: stop with a clear message; skip: drop the client
    target_accuracy: float | None = None  # for "rounds to reach" in summaries
    out: str = execution_field("runs/train")

    def replace(self, **changes: Any) -> RunConfig:
        return from_dict({**dataclasses.asdict(self), **changes})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}
# Where and how a run executes, not what it computes: what reports do not tabulate.
EXECUTION_FIELDS = execution_fields(RunConfig)
# What may differ when a run directory is resumed: those, and `rounds` (the run continues).
RESUMABLE_FIELDS = EXECUTION_FIELDS | {"rounds"}
_HINTS = typing.get_type_hints(RunConfig)


def _coerce(name: str, value: Any) -> Any:
    """Convert YAML / command-line values to the field's declared type, or explain why not."""
    hint = _HINTS[name]
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


def _check(cfg: RunConfig) -> None:
    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(msg)

    need(cfg.clients >= 1, f"clients must be >= 1, got {cfg.clients}")
    need(cfg.cohort_size is None or 1 <= cfg.cohort_size <= cfg.clients,
         f"cohort_size must be in [1, clients={cfg.clients}], got {cfg.cohort_size}")
    need(cfg.rounds >= 1, f"rounds must be >= 1, got {cfg.rounds}")
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
    from fedjax_lm.runner.robustness import check_robustness

    try:
        execution = executor(cfg)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    check_robustness(cfg, execution)
    from fedjax_lm.runner import privacy

    privacy.check(cfg, FIELDS["aggregator"].default)
    from fedjax_lm.data import PARTITIONERS, TASKS

    need(cfg.task in TASKS, f"unknown task {cfg.task!r}; valid tasks: {', '.join(sorted(TASKS))}")
    need(cfg.partition in PARTITIONERS,
         f"unknown partition {cfg.partition!r}; valid: {', '.join(sorted(PARTITIONERS))}")
    need(cfg.task != "csv" or cfg.train_file is not None, "task csv needs --train-file")
    from fedjax_lm.runner.peft import check_peft

    check_peft(cfg)
    _check_inputs(cfg)


SEED_MAX = 2**32 - 2  # jax keys hold 32 bits (2**32 is seed 0 again); runs also use seed + 1


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


def partition_params(cfg: RunConfig) -> dict[str, Any]:
    """The partitioner's parameters from the config (all but `natural`'s per-example groups)."""
    return {
        "dirichlet": {"alpha": cfg.alpha},
        "majority": {"p": cfg.p, "k": cfg.k},
        "quantity_skew": {"beta": cfg.beta},
    }.get(cfg.partition, {})



def executor(cfg: RunConfig):
    """The run's executor config (validated by the engine's own rules)."""
    from fedjax_lm.federated import ExecutorConfig

    return ExecutorConfig(backend=cfg.backend, clients_per_chunk=cfg.clients_per_chunk,
                          chunk_executor=cfg.chunk_executor)


def from_dict(values: dict[str, Any]) -> RunConfig:
    """Build and validate a config; unknown keys are an error (typos must not pass)."""
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise ConfigError(
            f"unknown config field(s): {', '.join(unknown)}; valid fields: {', '.join(FIELDS)}"
        )
    cfg = RunConfig(**{k: _coerce(k, v) for k, v in values.items()})
    from fedjax_lm.federated.robust import ALIASES  # the pre-issue-17 names, canonicalised

    cfg = dataclasses.replace(cfg, aggregator=ALIASES.get(cfg.aggregator, cfg.aggregator))
    _check(cfg)
    return cfg


@dataclasses.dataclass(frozen=True)
class Preset:
    """A YAML preset: base config values and an optional sweep grid (field → values)."""

    name: str
    base: dict[str, Any]
    grid: dict[str, list[Any]]


def load_preset(path: str | Path) -> Preset:
    """A preset file (`name`, `base`, `sweep`), checked whole before anything runs."""
    raw = load_yaml(path, keys=("name", "base", "sweep"))
    base = require_mapping(raw.get("base"), f"{path}: base")
    grid = require_mapping(raw.get("sweep"), f"{path}: sweep")
    check_keys(grid, FIELDS, f"{path}: sweep")
    expand_grid(grid, where=f"{path}: sweep")  # every axis a non-empty list
    try:
        from_dict(base)  # fail early on a bad base
    except ConfigError as e:
        raise ConfigError(f"{path}: base: {e}") from None
    return Preset(name=raw.get("name", Path(path).stem), base=dict(base), grid=dict(grid))


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`["clients=8", "lr=1e-4"]` → a dict with YAML-parsed values."""
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"override {pair!r} must look like field=value")
        key, value = pair.split("=", 1)
        key = key.strip().replace("-", "_")
        if key not in FIELDS:
            raise ConfigError(f"unknown config field {key!r} in override {pair!r}")
        try:
            out[key] = yaml.safe_load(value) if value else None
        except yaml.YAMLError:
            raise ConfigError(f"override {pair!r}: {value!r} is not a valid YAML value "
                              "(quote it, or write lists as [a, b])") from None
    return out
