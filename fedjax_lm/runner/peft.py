"""A run's parameter-efficient fine-tuning: the config's `peft` / `lora_*` / `freeze_layers`
checked once, turned into the model's LoRA settings and the engine's pieces (trainable mask,
per-client rank mask, aggregator), and the communication each client costs.

LoRA aggregation (`lora_aggregation`):
    fedit  A and B averaged separately (the common default; biased: mean(A)·mean(B) is not
           mean(A·B));
    ffa    A frozen at its shared init, only B trained and averaged: exact, since
           A·mean(B) = mean(A·B);
    exact  the mean of the products A_i B_i refactored to rank R by truncated SVD
           (`federated.lowrank`, which says why refactoring rather than a residual in the base).
Heterogeneous ranks (`lora_ranks`): client i trains the first r_i components of the padded
rank-R adapters (one compiled program for every rank; the rest start, stay and are sent as
zero, so `fedit` / `ffa` average zero-padded and `exact` averages the zero-padded products).
Every client uses the program's scale alpha / R. r_i comes from one of three forms:
    2,4,8              a list: client i gets entry i mod len (round robin);
    2:0.5,4:0.3,8:0.2  resource tiers: rank:share, shares summing to 1; round(share·N) clients
                       per tier (largest remainder), placed by a permutation seeded from the
                       run's seed (stream 19), so a tier's size is exact, not a draw;
    uniform:2,8        every whole rank in [2, 8] as an equal-share tier.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from fedjax_lm import federated as fl
from fedjax_lm.federated.trainable import count, trainable_part
from fedjax_lm.grid import ConfigError
from fedjax_lm.models.config import LORA_TARGET_NAMES
from fedjax_lm.models.lora import LORA_A, LORA_B
from fedjax_lm.models.peft import PEFT_MODES, rank_mask, trainable_predicate

LORA_AGGREGATIONS = ("fedit", "ffa", "exact")
LORA_DEFAULTS = {"lora_rank": 8, "lora_alpha": 16.0, "lora_dropout": 0.0,
                 "lora_targets": ("query", "value"), "lora_aggregation": "fedit"}
LORA_FIELDS = (*LORA_DEFAULTS, "lora_ranks")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def lora_settings(cfg: Any) -> dict[str, Any]:
    """The LoRA fields with their defaults filled in (R is the largest per-client rank when
    only `lora_ranks` is given)."""
    out = {k: getattr(cfg, k) if getattr(cfg, k) is not None else v
           for k, v in LORA_DEFAULTS.items()}
    ranks = client_ranks(cfg)
    if cfg.lora_rank is None and ranks is not None:
        out["lora_rank"] = int(ranks.max())
    return out


_RANKS_STREAM = 19  # numpy seed stream of the tier placement: (seed, 19)
RANKS_HELP = "a list (2,4,8), tiers rank:share (2:0.5,4:0.3,8:0.2) or uniform:LO,HI"


@dataclasses.dataclass(frozen=True)
class RankSpec:
    """`lora_ranks` parsed: the ranks and, for tiers, each one's share (None: round robin)."""

    ranks: np.ndarray  # int32 [T]
    shares: np.ndarray | None  # float [T] summing to 1, or None for a list

    def population(self, num_clients: int, seed: int) -> np.ndarray:
        """int32 [N]: each client's rank (tier sizes exact, placement seeded)."""
        if self.shares is None:
            return np.resize(self.ranks, num_clients).astype(np.int32)
        want = self.shares * num_clients
        counts = np.floor(want).astype(np.int64)
        extra = np.argsort(-(want - counts), kind="stable")[: num_clients - counts.sum()]
        counts[extra] += 1
        ordered = np.repeat(self.ranks, counts)
        return ordered[np.random.default_rng((seed, _RANKS_STREAM)).permutation(num_clients)]


def _whole(text: str, spec: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"lora_ranks {spec}: {text!r} is not a whole number; give "
                          f"{RANKS_HELP}") from None


def rank_spec(cfg: Any) -> RankSpec | None:
    """`lora_ranks` parsed (ConfigError in one line for a malformed one), or None."""
    if cfg.lora_ranks is None:
        return None
    items, spec = list(cfg.lora_ranks), ",".join(cfg.lora_ranks)
    if items[0].startswith("uniform:"):
        bounds = [items[0][len("uniform:"):], *items[1:]]
        if len(bounds) != 2:
            raise ConfigError(f"lora_ranks {spec}: uniform takes two bounds (uniform:2,8)")
        lo, hi = (_whole(b, spec) for b in bounds)
        if lo > hi:
            raise ConfigError(f"lora_ranks {spec}: the lower bound {lo} exceeds the upper {hi}")
        ranks = np.arange(lo, hi + 1, dtype=np.int32)
        return RankSpec(ranks, np.full(len(ranks), 1 / len(ranks)))
    if not any(":" in i for i in items):
        return RankSpec(np.array([_whole(i, spec) for i in items], np.int32), None)
    pairs = [i.split(":") for i in items]
    if any(len(p) != 2 for p in pairs):
        raise ConfigError(f"lora_ranks {spec}: tiers are rank:share pairs; give {RANKS_HELP}")
    try:
        shares = np.array([float(p[1]) for p in pairs])
    except ValueError:
        raise ConfigError(f"lora_ranks {spec}: a share is not a number; give {RANKS_HELP}"
                          ) from None
    ranks = np.array([_whole(p[0], spec) for p in pairs], np.int32)
    if len(set(ranks.tolist())) != len(ranks):
        raise ConfigError(f"lora_ranks {spec}: a rank appears in two tiers; merge their shares")
    if not (np.all(np.isfinite(shares)) and np.all(shares > 0)
            and abs(shares.sum() - 1) <= 1e-6):
        raise ConfigError(f"lora_ranks {spec}: tier shares must be > 0 and sum to 1 (they sum "
                          f"to {shares.sum():g})")
    return RankSpec(ranks, shares / shares.sum())


def client_ranks(cfg: Any) -> np.ndarray | None:
    """The ranks `lora_ranks` can give (list entries, tiers or the uniform range), or None."""
    spec = rank_spec(cfg)
    return None if spec is None else spec.ranks


def mode(cfg: Any) -> str:
    """The run's PEFT mode (`peft: none` reads as null in YAML and on the command line)."""
    return cfg.peft or "none"


def check_peft(cfg: Any) -> None:
    """Refuse a PEFT config that would fail (or silently do nothing) later: one line each."""

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(msg)

    need(mode(cfg) in PEFT_MODES,
         f"peft must be one of {', '.join(PEFT_MODES)}, got {cfg.peft!r}")
    need(cfg.freeze_layers >= 0, f"freeze_layers must be >= 0, got {cfg.freeze_layers}")
    given = [_flag(k) for k in LORA_FIELDS if getattr(cfg, k) is not None]
    need(cfg.peft == "lora" or not given,
         f"{', '.join(given)} need{'s' if len(given) == 1 else ''} --peft lora (got --peft "
         f"{mode(cfg)}); add --peft lora or drop {'it' if len(given) == 1 else 'them'}")
    need(mode(cfg) == "none" or cfg.algorithm in ("fedavg", "fedprox"),
         f"peft {cfg.peft} runs with algorithm fedavg or fedprox, not {cfg.algorithm}")
    need(cfg.freeze_layers == 0 or cfg.algorithm in ("fedavg", "fedprox"),
         f"freeze_layers runs with algorithm fedavg or fedprox, not {cfg.algorithm} (its "
         "control variates would train the frozen layers); drop --freeze-layers")
    if cfg.peft != "lora":
        return
    lora = lora_settings(cfg)
    need(lora["lora_rank"] >= 1, f"lora_rank must be >= 1, got {lora['lora_rank']}")
    need(lora["lora_alpha"] > 0, f"lora_alpha must be > 0, got {lora['lora_alpha']}")
    need(0 <= lora["lora_dropout"] < 1, f"lora_dropout must be in [0, 1), got "
                                        f"{lora['lora_dropout']}")
    targets = lora["lora_targets"]
    need(bool(targets) and all(targets),  # `query,,value`: an empty name, not an unknown one
         f"lora_targets {','.join(targets) or '(none)'} has an empty name; list projections "
         f"separated by single commas from: {', '.join(LORA_TARGET_NAMES)}")
    bad = [t for t in targets if t not in LORA_TARGET_NAMES]
    need(not bad, f"lora_targets {','.join(bad)} match no projection; valid: "
                  f"{', '.join(LORA_TARGET_NAMES)}")
    need(lora["lora_aggregation"] in LORA_AGGREGATIONS,
         f"lora_aggregation must be one of {', '.join(LORA_AGGREGATIONS)}, got "
         f"{lora['lora_aggregation']!r}")
    need(lora["lora_aggregation"] != "exact" or (
        cfg.server_optimizer == "fedavg" and cfg.server_lr == 1
        and cfg.aggregator == "mean" and cfg.attack is None),
         "lora_aggregation exact replaces the adapters by the refactored mean product: it needs "
         "server_optimizer=fedavg, server_lr=1, aggregator=mean and no attack")
    ranks = client_ranks(cfg)
    if ranks is not None:
        need(len(ranks) >= 1 and ranks.min() >= 1 and ranks.max() <= lora["lora_rank"],
             f"lora_ranks must lie in [1, lora_rank={lora['lora_rank']}], got "
             f"{','.join(map(str, ranks))}")


def model_overrides(cfg: Any) -> dict[str, Any]:
    """`EncoderConfig` fields for the run's adapters (none without `peft=lora`)."""
    if cfg.peft != "lora":
        return {}
    lora = lora_settings(cfg)
    return {k: lora[k] for k in ("lora_rank", "lora_alpha", "lora_dropout", "lora_targets")}


@dataclasses.dataclass(frozen=True)
class PeftPlan:
    """The engine's pieces for a run and what a client sends and receives per round."""

    trainable: Any | None  # bool mask over the params; None: everything trains
    client_mask: Any | None  # per-client rank mask, or None
    aggregator: fl.Aggregator | None  # None: the run's own aggregator
    fixed_bytes: int  # trainable bytes that are not LoRA components
    rank_bytes: int  # bytes of one LoRA rank component summed over every trained adapter
    ranks: np.ndarray | None  # per-population-client rank, or None (all R)
    frozen_bytes: int  # the base, downloaded once
    full_rank: int  # R (0 without LoRA)

    def client_bytes(self, ids: np.ndarray) -> float:
        """Mean bytes one client of `ids` sends (= receives) per round: its trainable leaves,
        LoRA components up to its own rank. 0.0 for an empty cohort (a Poisson round nobody
        joined): nothing is sent."""
        if not len(ids):
            return 0.0
        if self.ranks is None:
            return float(self.fixed_bytes + self.rank_bytes * self.full_rank)
        return float(self.fixed_bytes + self.rank_bytes * self.ranks[ids].mean())


def build_peft(cfg: Any, params: Any, num_clients: int) -> PeftPlan:
    """The run's PEFT plan for `params` (raises ConfigError for a layer count it lacks)."""
    lora = lora_settings(cfg)
    layers = len(params.get("layers", {}))
    if cfg.freeze_layers > layers:
        raise ConfigError(f"freeze_layers {cfg.freeze_layers} exceeds the model's {layers} stored "
                          f"layers; use at most {layers}")
    ffa = cfg.peft == "lora" and lora["lora_aggregation"] == "ffa"
    pred = trainable_predicate(mode(cfg), freeze_layers=cfg.freeze_layers, freeze_lora_a=ffa)
    mask = None if pred is None else fl.mask_from_predicate(params, pred)
    train = trainable_part(mask, params)
    fixed, per_rank = 0, 0
    for path, x in jax.tree_util.tree_leaves_with_path(train):
        name = str(getattr(path[-1], "key", path[-1]))
        size = x.dtype.itemsize
        if name == LORA_A:
            per_rank += x.shape[0] * size
        elif name == LORA_B:
            per_rank += x.shape[1] * size
        else:
            fixed += x.size * size
    if cfg.peft == "lora" and per_rank == 0:
        raise ConfigError(f"freeze_layers {cfg.freeze_layers} freezes every layer that holds "
                          "adapters: only the head would train; lower --freeze-layers, or use "
                          "--peft head")
    spec = rank_spec(cfg) if cfg.peft == "lora" else None
    population = None if spec is None else spec.population(num_clients, cfg.seed)
    trainable_bytes, total = count(mask, params)
    return PeftPlan(
        trainable=mask,
        client_mask=None if population is None else rank_mask(population),
        aggregator=(fl.factor_product_mean(LORA_A, LORA_B)
                    if cfg.peft == "lora" and lora["lora_aggregation"] == "exact" else None),
        fixed_bytes=fixed, rank_bytes=per_rank, ranks=population,
        frozen_bytes=total - trainable_bytes,
        full_rank=lora["lora_rank"] if cfg.peft == "lora" else 0,
    )


def communication(records: list[dict], plan: PeftPlan) -> dict[str, Any]:
    """For final.json: bytes per client per round (mean over the run's rounds) and the frozen
    base, sent once."""
    def mean(key):
        values = [r[key] for r in records if key in r]
        return float(np.mean(values)) if values else None

    return {"upload_bytes_per_client": mean("upload_bytes_per_client"),
            "download_bytes_per_client": mean("download_bytes_per_client"),
            "base_download_bytes": plan.frozen_bytes}
