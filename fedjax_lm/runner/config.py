"""The typed run configuration: one frozen `RunConfig`, every field that varies between runs.

A run directory's `config.yaml` is enough to reproduce or resume the run. The rules the fields
must satisfy are `checks` (`checks.from_dict` builds a checked config); YAML presets and
command-line overrides are `presets`.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from fedjax_lm.grid import execution_field, execution_fields


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
    dedupe: bool = False  # blog10/blog50: drop every text posted more than once (by any author)
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
    # population evaluation: H more clients partitioned with the population but never trained
    # on, and a seeded sample of K training (and K held-out) clients evaluated on their own
    # data each eval round (accuracy percentiles p10/p50/p90/worst in metrics.jsonl)
    holdout_clients: int = 0
    eval_clients: int | None = None
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
    # pack round r + 1's cohort on a background thread while round r runs (same numbers)
    prefetch: bool = execution_field(True)
    checkpoint_every: int = execution_field(1)
    nonfinite: str = "fail"  # fail: stop with a clear message; skip: drop the client
    target_accuracy: float | None = None  # for "rounds to reach" in summaries
    out: str = execution_field("runs/train")

    def replace(self, **changes: Any) -> RunConfig:
        """This config with `changes`, unchecked: `train` checks what it runs (or check with
        `checks.from_dict(cfg.to_dict())`)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}
# Where and how a run executes, not what it computes: what reports do not tabulate.
EXECUTION_FIELDS = execution_fields(RunConfig)
# What may differ when a run directory is resumed: those, and `rounds` (the run continues).
RESUMABLE_FIELDS = EXECUTION_FIELDS | {"rounds"}
HINTS = typing.get_type_hints(RunConfig)  # each field's declared type
