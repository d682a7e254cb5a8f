"""The run's aggregator and attack from its config: the checks (called once by `checks`) and
the construction (`experiment`), kept together so the names and rules live in one place."""

from __future__ import annotations

from typing import Any

import numpy as np

from fedjax_lm import federated as fl
from fedjax_lm.grid import ConfigError
from fedjax_lm.runner.config import RunConfig


def check_robustness(cfg: RunConfig, executor: fl.ExecutorConfig) -> None:
    """The aggregator, the attack and their parameters (issue 17), and whether `executor`
    can run the aggregator (an order statistic cannot run as chunk sums)."""

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(msg)

    need(cfg.aggregator in fl.AGGREGATORS,
         f"unknown aggregator {cfg.aggregator!r}; choose one of {', '.join(fl.AGGREGATORS)}")
    need(0 <= cfg.trim_fraction < 0.5,
         f"trim_fraction must be in [0, 0.5), got {cfg.trim_fraction}")
    need(cfg.norm_bound is None or cfg.norm_bound > 0,
         f"norm_bound must be > 0, got {cfg.norm_bound}")
    need(cfg.aggregator != "norm_bound" or cfg.norm_bound is not None,
         "aggregator norm_bound needs the bound: set --norm-bound (e.g. 1.0)")
    need(cfg.byzantine >= 0, f"byzantine must be >= 0, got {cfg.byzantine}")
    # Krum's n > 2f+2 (and Multi-Krum's m <= n) must hold in every round. A Poisson cohort
    # has no guaranteed minimum size (max_cohort_size pads and truncates, it never fills),
    # so any round may draw too few clients. The other rules need no minimum: the median,
    # the trimmed mean (a fraction of the live n) and the geometric median take any n >= 1.
    need(cfg.sampling != "poisson" or cfg.aggregator not in ("krum", "multi_krum"),
         f"aggregator {cfg.aggregator} needs more than 2f+2 = {2 * cfg.byzantine + 2} "
         "clients in every round, and a Poisson cohort can be smaller (it has no minimum "
         "size): use --sampling fixed")
    cohort = cfg.cohort_size or cfg.clients
    need(cfg.aggregator not in ("krum", "multi_krum") or cohort > 2 * cfg.byzantine + 2,
         f"aggregator {cfg.aggregator} with byzantine={cfg.byzantine} needs more than "
         f"2f+2 = {2 * cfg.byzantine + 2} clients per round, got {cohort}; lower --byzantine "
         "or raise --cohort-size / --clients")
    need(cfg.multi_krum_m is None or 1 <= cfg.multi_krum_m <= cohort,
         f"multi_krum_m must be in [1, {cohort}] (the clients per round), got {cfg.multi_krum_m}")
    need(cfg.attack is None or cfg.attack in fl.ATTACKS,
         f"unknown attack {cfg.attack!r}; choose one of {', '.join(fl.ATTACKS)}")
    need((cfg.attack is None) == (cfg.malicious_fraction is None),
         f"attack {cfg.attack} needs --malicious-fraction (e.g. 0.2)" if cfg.attack
         else "malicious_fraction is set but there is no attack: set --attack (e.g. sign_flip)"
              " or unset --malicious-fraction")
    fraction = cfg.malicious_fraction
    need(fraction is None or 0 <= fraction < 0.5,
         f"malicious_fraction must be in [0, 0.5) (malicious clients are a minority), got "
         f"{fraction}")
    need(cfg.attack_std > 0, f"attack_std must be > 0, got {cfg.attack_std}")
    need(cfg.algorithm != "scaffold" or (cfg.aggregator == "mean"
                                         and cfg.attack in (None, "label_flip")),
         f"algorithm scaffold sends (model, control) and averages them: aggregator "
         f"{cfg.aggregator} / attack {cfg.attack} need algorithm fedavg or fedprox")
    try:
        executor.check_aggregator(aggregator(cfg))
    except ValueError as e:
        raise ConfigError(str(e)) from None


def aggregator(cfg: RunConfig, malicious: Any = None) -> fl.Aggregator:
    """The run's aggregator, attacked by the `malicious` clients (`bool[N]`; None: none)."""
    agg = fl.make_aggregator(fl.RobustConfig(
        cfg.aggregator, trim_fraction=cfg.trim_fraction, norm_bound=cfg.norm_bound,
        byzantine=cfg.byzantine, multi_krum_m=cfg.multi_krum_m))
    attack = fl.AttackConfig(cfg.attack or "none", scale=cfg.attack_scale, std=cfg.attack_std)
    mask = np.zeros(cfg.clients, bool) if malicious is None else malicious
    return fl.attacked(agg, attack, mask)
