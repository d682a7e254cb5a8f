"""The run's privacy: DP flags checked once, the mechanism and its accounting resolved once
(δ, a calibrated z, the padded Poisson cohort), the round's cohort drawn, ε per round.

Everything here is a pure function of the config, so a resumed run draws the same cohorts and
reports the same ε. The math lives in `federated.privacy` (the round) and
`federated.accounting` (dp-accounting).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import numpy as np

from fedjax_lm.federated import accounting
from fedjax_lm.federated.privacy import DPConfig
from fedjax_lm.federated.sampling import pad_cohort, poisson_clients, sample_clients, sampling_key
from fedjax_lm.grid import ConfigError
from fedjax_lm.runner.config import RunConfig

SAMPLINGS = accounting.SAMPLINGS
ACCOUNTANTS = accounting.ACCOUNTANTS
DP_ONLY = ("dp_noise_multiplier", "target_epsilon", "dp_clip_quantile", "dp_delta",
           "dp_count_stddev")


def dp_enabled(cfg: RunConfig) -> bool:
    return cfg.dp_clip is not None


def expected_clients(cfg: RunConfig) -> int:
    return cfg.cohort_size or cfg.clients


def check(cfg: RunConfig, default_aggregator: str) -> None:
    """Refuse a bad DP / sampling config with one line (cause and fix)."""

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(msg)

    need(cfg.sampling in SAMPLINGS, f"sampling must be one of {', '.join(SAMPLINGS)}, got "
                                    f"{cfg.sampling!r}")
    need(cfg.dp_accountant in ACCOUNTANTS,
         f"dp_accountant must be one of {', '.join(ACCOUNTANTS)}, got {cfg.dp_accountant!r}")
    need(cfg.max_cohort_size is None or cfg.sampling == "poisson",
         "max_cohort_size pads Poisson cohorts; it needs sampling=poisson")
    need(cfg.max_cohort_size is None or expected_clients(cfg) <= cfg.max_cohort_size
         <= cfg.clients, f"max_cohort_size must be in [cohort_size={expected_clients(cfg)}, "
                         f"clients={cfg.clients}], got {cfg.max_cohort_size}")
    if not dp_enabled(cfg):
        for name in DP_ONLY:
            need(getattr(cfg, name) is None,
                 f"{name} needs dp_clip (the L2 bound on each client's update that the noise "
                 "is scaled to): add --dp-clip C")
        need(not cfg.dp_clip_per_layer, "dp_clip_per_layer needs dp_clip: add --dp-clip C")
        return
    need(cfg.dp_clip > 0, f"dp_clip must be > 0 (the L2 bound on each client's update), got "
                          f"{cfg.dp_clip:g}")
    need(cfg.dp_noise_multiplier is None or cfg.target_epsilon is None,
         "set dp_noise_multiplier or target_epsilon (which calibrates it), not both")
    need(cfg.target_epsilon is None or cfg.target_epsilon > 0,
         f"target_epsilon must be > 0, got {cfg.target_epsilon}")
    need(cfg.aggregator == default_aggregator,
         f"DP-FedAvg adds its noise to a clipped sum with a fixed denominator; aggregator "
         f"{cfg.aggregator!r} is not that sum: use aggregator={default_aggregator} with DP")
    need(cfg.attack in (None, "label_flip"),
         f"attack {cfg.attack} rewrites the messages the aggregator sees, and DP-FedAvg "
         "replaces the aggregator by its clipped sum: use --attack label_flip (poisoned data) "
         "with DP, or drop --dp-clip")
    need(cfg.lora_aggregation != "exact",
         "lora_aggregation exact refactors the mean adapter product, which DP-FedAvg's noised "
         "sum of deltas is not: use --lora-aggregation fedit or ffa with DP")
    need(cfg.algorithm != "scaffold", "DP-FedAvg clips the client's model delta; scaffold also "
                                      "sends control variates: use algorithm fedavg or fedprox")
    limit = 1 / cfg.clients
    need(cfg.dp_delta is None or 0 < cfg.dp_delta < limit,
         f"dp_delta must be in (0, 1/clients = {limit:.3g}): a delta of 1/N or more allows "
         f"publishing one client's data outright; got {cfg.dp_delta}")
    try:
        setting = _setting(cfg, 0.0)
        mechanism = dp_config(cfg, 0.0)
        if cfg.dp_noise_multiplier is not None:
            dp_config(cfg, cfg.dp_noise_multiplier)
        if cfg.target_epsilon is not None:
            accounting.check_reachable(setting, cfg.rounds, cfg.target_epsilon, delta(cfg),
                                       _max_noise(mechanism))
    except ValueError as e:
        raise ConfigError(str(e).replace("noise_multiplier", "dp_noise_multiplier")) from None


def delta(cfg: RunConfig) -> float:
    return cfg.dp_delta if cfg.dp_delta is not None else accounting.default_delta(cfg.clients)


def _setting(cfg: RunConfig, z: float) -> accounting.PrivacySetting:
    return accounting.PrivacySetting(cfg.clients, expected_clients(cfg), z, cfg.sampling,
                                     cfg.dp_accountant)


def _max_noise(mechanism: DPConfig) -> float:
    return min(accounting.MAX_NOISE_MULTIPLIER, 0.999 * mechanism.max_noise_multiplier)


def dp_config(cfg: RunConfig, noise_multiplier: float) -> DPConfig:
    return DPConfig(clip=cfg.dp_clip, noise_multiplier=noise_multiplier,
                    expected_clients=expected_clients(cfg), per_layer=cfg.dp_clip_per_layer,
                    target_quantile=cfg.dp_clip_quantile, clip_learning_rate=cfg.dp_clip_lr,
                    count_stddev=cfg.dp_count_stddev)


def fixed_by_rounds(cfg: RunConfig) -> str | None:
    """What of the plan the configured rounds decide (so a resume may not change them)."""
    if cfg.target_epsilon is not None:
        return "noise multiplier (calibrated for target_epsilon)"
    if cfg.sampling == "poisson" and cfg.max_cohort_size is None:
        return "padded Poisson cohort size (set max_cohort_size to pin it)"
    return None


@dataclasses.dataclass(frozen=True)
class PrivacyPlan:
    """The run's resolved privacy and sampling (None fields: not applicable)."""

    mechanism: DPConfig | None
    setting: accounting.PrivacySetting | None
    delta: float | None
    max_cohort: int | None  # Poisson: the padded cohort size
    overflow_delta: float  # what truncating at max_cohort adds to δ (0 without DP)

    def epsilon(self, rounds: int) -> float | None:
        return None if self.setting is None else accounting.epsilon(self.setting, rounds,
                                                                    self.delta)

    def lines(self, cfg: RunConfig) -> list[str]:
        """What the run prints before round 1."""
        out = []
        if self.max_cohort is not None:
            out.append(f"sampling: poisson, each of {cfg.clients} clients with p = "
                       f"{expected_clients(cfg) / cfg.clients:.4g}; cohorts padded to "
                       f"{self.max_cohort} (larger ones truncated at random)")
        if self.mechanism is None:
            return out
        m = self.mechanism
        how = "calibrated for target_epsilon " + f"{cfg.target_epsilon:g}" \
            if cfg.target_epsilon is not None else "given"
        if cfg.dp_delta is None:
            out.append(f"dp: delta not given: using 1/N^1.1 = {self.delta:.3g} (N = "
                       f"{cfg.clients})")
        clip = (f"adaptive clip from {m.clip:g} toward the {m.target_quantile:g}-quantile"
                if m.adaptive else f"clip {m.clip:g}" + (" per layer" if m.per_layer else ""))
        out.append(f"dp: DP-FedAvg, {clip}, noise multiplier {m.noise_multiplier:.4g} ({how}), "
                   f"fixed denominator {m.expected_clients:g}; after {cfg.rounds} rounds "
                   f"epsilon = {self.epsilon(cfg.rounds):.4g} at delta = {self.delta:.3g} "
                   f"({cfg.dp_accountant}, {cfg.sampling} sampling)")
        if self.overflow_delta:
            out.append(f"dp: truncating cohorts at {self.max_cohort} adds at most "
                       f"{self.overflow_delta:.3g} to delta")
        return out


@functools.lru_cache(maxsize=8)
def plan(cfg: RunConfig) -> PrivacyPlan:
    """Resolve z (calibrated when target_epsilon is set), δ and the Poisson padding."""
    rate = expected_clients(cfg) / cfg.clients
    if not dp_enabled(cfg):
        max_cohort = None
        if cfg.sampling == "poisson":
            max_cohort = cfg.max_cohort_size or accounting.default_max_cohort(
                cfg.clients, rate, cfg.rounds, 1e-6)
        return PrivacyPlan(None, None, None, max_cohort, 0.0)
    d = delta(cfg)
    z = cfg.dp_noise_multiplier or 0.0
    if cfg.target_epsilon is not None:
        z = accounting.calibrate_noise(_setting(cfg, 0.0), cfg.rounds, cfg.target_epsilon, d,
                                       _max_noise(dp_config(cfg, 0.0)))
    setting = _setting(cfg, z)
    max_cohort, extra = None, 0.0
    if cfg.sampling == "poisson":
        eps = accounting.epsilon(setting, cfg.rounds, d)
        budget = 1e-6 if not math.isfinite(eps) else (
            accounting.OVERFLOW_SHARE * d / (1 + math.exp(min(eps, 700))))
        max_cohort = cfg.max_cohort_size or accounting.default_max_cohort(
            cfg.clients, rate, cfg.rounds, budget)
        if math.isfinite(eps):
            extra = accounting.overflow_delta(cfg.clients, rate, max_cohort, cfg.rounds, eps)
    return PrivacyPlan(dp_config(cfg, z), setting, d, max_cohort, extra)


class RoundCohort:
    """One round's clients: `ids` (padded for Poisson), the first `size` real."""

    def __init__(self, ids: np.ndarray, size: int, dropped: int = 0):
        self.ids, self.size, self.dropped = ids, size, dropped

    @property
    def real_ids(self) -> np.ndarray:
        return self.ids[: self.size]

    def real(self, rows: Any) -> Any:
        """The real clients' rows of a `[padded, ...]` pytree."""
        return jax.tree.map(lambda x: x[: self.size], rows)

    def zero_padding(self, data: dict[str, Any]) -> dict[str, Any]:
        """The fillers' data zeroed: no example, so weight 0 and no step."""
        for leaf in data.values():
            leaf[self.size:] = 0
        return data


def draw_cohort(cfg: RunConfig, base_key: jax.Array, round_index: int) -> RoundCohort:
    """Round `round_index`'s cohort from the config's sampling (a pure function of the seed)."""
    key = sampling_key(base_key, round_index)
    if cfg.sampling == "poisson":
        size = plan(cfg).max_cohort
        ids, dropped = poisson_clients(key, cfg.clients, expected_clients(cfg) / cfg.clients,
                                       size)
        return RoundCohort(pad_cohort(ids, cfg.clients, size), len(ids), dropped)
    cohort = expected_clients(cfg)
    ids = (sample_clients(key, cfg.clients, cohort) if cohort < cfg.clients
           else np.arange(cfg.clients))
    return RoundCohort(ids, len(ids))


def truncation_warning(round_number: int, cohort: RoundCohort) -> str:
    return (f"warning: round {round_number}: {cohort.size + cohort.dropped} clients joined, "
            f"more than max_cohort_size {cohort.size}; {cohort.dropped} dropped at random "
            "(the final dp_overflow_delta bounds what this costs the guarantee)")


def round_record(cfg: RunConfig, state: Any, rounds_done: int, cohort: RoundCohort) -> dict:
    """The privacy / sampling fields of a round's metrics record."""
    record: dict[str, Any] = {}
    if cfg.sampling == "poisson":
        record["truncated_clients"] = cohort.dropped
    if dp_enabled(cfg):
        record["epsilon"] = plan(cfg).epsilon(rounds_done)
        record["dp_clip"] = float(state.opt_state.clip)
    return record


def final_record(cfg: RunConfig, records: list[dict]) -> dict:
    """The privacy fields of final.json."""
    if not dp_enabled(cfg):
        return {}
    p = plan(cfg)
    return {"epsilon": p.epsilon(cfg.rounds), "dp_delta": p.delta,
            "dp_noise_multiplier_used": p.mechanism.noise_multiplier,
            "dp_overflow_delta": p.overflow_delta,
            "truncated_clients": int(sum(r.get("truncated_clients", 0) for r in records))}
