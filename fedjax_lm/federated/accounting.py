"""Privacy accounting for DP-FedAvg with Google's `dp-accounting` (host-side math, outside the
round): ε after r rounds at δ, the noise multiplier for a target ε, and the padded size of a
Poisson cohort.

A round is one Gaussian sum of sensitivity `clip` (user-level, add/remove one client) with
multiplier z, on a sampled cohort:

- `poisson`: each of N clients joins with probability q = m/N → `PoissonSampledDpEvent`
  (RDP or PLD); cohorts beyond the padded maximum are truncated, which `overflow_delta` bounds;
- `fixed`: m of N without replacement → `SampledWithoutReplacementDpEvent`, which dp-accounting
  analyses (RDP only) under replace-one adjacency, where the sum's sensitivity is 2·clip, so the
  event's multiplier is z/2;
- m = N (everyone, every round): plain Gaussian composition.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import dp_accounting


@functools.cache
def _dp() -> Any:
    """dp-accounting (and through it scipy.signal): ~1 s to import, so only runs that account
    for privacy pay it, not every CLI start."""
    import dp_accounting

    return dp_accounting


def _binom() -> Any:
    from scipy import stats

    return stats.binom

ACCOUNTANTS = ("rdp", "pld")
SAMPLINGS = ("fixed", "poisson")
# The calibration's search range for z: beyond it the noise std exceeds 100 clips per expected
# client and nothing is learned, so a target needing more is reported as out of reach.
MAX_NOISE_MULTIPLIER = 100.0
# ... and below this floor the PLD accountant's grid grows unboundedly (ε is in the hundreds
# there anyway): a target that loose gets this z.
MIN_NOISE_MULTIPLIER = 0.25
CALIBRATION_TOL = 1e-3
OVERFLOW_SHARE = 0.01  # default padding: truncation adds at most 1 % of δ


@dataclasses.dataclass(frozen=True)
class PrivacySetting:
    """What ε depends on besides the rounds and δ."""

    population: int  # N
    expected_clients: float  # m
    noise_multiplier: float  # z (the total, adaptive clipping's count included)
    sampling: str = "poisson"
    accountant: str = "rdp"

    def __post_init__(self):
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"sampling must be one of {SAMPLINGS}, got {self.sampling!r}")
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {self.accountant!r}")
        if not 0 < self.expected_clients <= self.population:
            raise ValueError(f"expected_clients must be in (0, {self.population}], got "
                             f"{self.expected_clients}")
        if self.without_replacement and self.accountant == "pld":
            raise ValueError("dp-accounting's PLD accountant does not analyse sampling without "
                             "replacement; use accountant rdp or sampling poisson")

    @property
    def rate(self) -> float:
        return self.expected_clients / self.population

    @property
    def without_replacement(self) -> bool:
        return self.sampling == "fixed" and self.expected_clients < self.population

    def with_noise(self, noise_multiplier: float) -> PrivacySetting:
        return dataclasses.replace(self, noise_multiplier=noise_multiplier)


def round_event(setting: PrivacySetting) -> dp_accounting.DpEvent:
    """One round as a dp-accounting event (see the module docstring)."""
    z = setting.noise_multiplier
    if setting.expected_clients == setting.population:
        return _dp().GaussianDpEvent(z)
    if setting.without_replacement:
        return _dp().SampledWithoutReplacementDpEvent(
            setting.population, int(setting.expected_clients), _dp().GaussianDpEvent(z / 2))
    return _dp().PoissonSampledDpEvent(setting.rate, _dp().GaussianDpEvent(z))


def make_accountant(setting: PrivacySetting) -> dp_accounting.PrivacyAccountant:
    if setting.accountant == "pld":
        return _dp().pld.PLDAccountant()
    relation = (_dp().NeighboringRelation.REPLACE_ONE if setting.without_replacement
                else _dp().NeighboringRelation.ADD_OR_REMOVE_ONE)
    return _dp().rdp.RdpAccountant(neighboring_relation=relation)


def epsilon(setting: PrivacySetting, rounds: int, delta: float) -> float:
    """ε at `delta` after `rounds` rounds (inf without noise, 0 after no round): a pure
    function of its arguments, so a resumed run reports the same ε."""
    if rounds == 0:
        return 0.0
    if setting.noise_multiplier == 0:
        return math.inf
    accountant = make_accountant(setting)
    accountant.compose(round_event(setting), rounds)
    return float(accountant.get_epsilon(delta))


def calibrate_noise(setting: PrivacySetting, rounds: int, target_epsilon: float, delta: float,
                    max_noise: float = MAX_NOISE_MULTIPLIER) -> float:
    """The smallest z (within `CALIBRATION_TOL`, never below `MIN_NOISE_MULTIPLIER`) whose ε
    after `rounds` rounds is at most `target_epsilon`; ValueError when even `max_noise` does
    not reach it."""
    check_reachable(setting, rounds, target_epsilon, delta, max_noise)
    low = MIN_NOISE_MULTIPLIER
    if epsilon(setting.with_noise(low), rounds, delta) <= target_epsilon:
        return low
    z = _dp().calibrate_dp_mechanism(
        lambda: make_accountant(setting),
        lambda z: _dp().SelfComposedDpEvent(round_event(setting.with_noise(z)), rounds),
        target_epsilon, delta,
        bracket_interval=_dp().ExplicitBracketInterval(low, max_noise),
        tol=CALIBRATION_TOL)
    # Brent stops within tol of the boundary, on either side: step to the private side.
    while epsilon(setting.with_noise(z), rounds, delta) > target_epsilon:
        z += CALIBRATION_TOL
    return float(z)


def check_reachable(setting: PrivacySetting, rounds: int, target_epsilon: float, delta: float,
                    max_noise: float = MAX_NOISE_MULTIPLIER) -> None:
    """ValueError (one line: cause and fix) if z = `max_noise` still exceeds the target."""
    reached = epsilon(setting.with_noise(max_noise), rounds, delta)
    if reached > target_epsilon:
        raise ValueError(
            f"target_epsilon {target_epsilon:g} is out of reach in {rounds} rounds: even "
            f"noise_multiplier {max_noise:g} gives epsilon {reached:.3g}; train fewer rounds, "
            "sample fewer clients per round or raise the target")


def default_delta(population: int) -> float:
    """δ = 1/N^1.1 (McMahan et al. 2018): below 1/N, as a meaningful δ must be."""
    return float(population) ** -1.1


def overflow_probability(population: int, rate: float, max_size: int) -> float:
    """P(a Poisson cohort exceeds `max_size`) per round, for N or N+1 clients (add/remove)."""
    return float(_binom().sf(max_size, population + 1, rate))


def overflow_delta(population: int, rate: float, max_size: int, rounds: int,
                   eps: float) -> float:
    """What truncating cohorts at `max_size` adds to δ: the truncated mechanism differs from
    the Poisson one only if some round overflows (probability ≤ T·p, on either neighbour),
    so it is (ε, δ + (1 + e^ε)·T·p)-DP."""
    p = overflow_probability(population, rate, max_size)
    if p == 0:
        return 0.0
    return math.inf if eps > 700 else (1 + math.exp(eps)) * rounds * p


def default_max_cohort(population: int, rate: float, rounds: int, budget: float) -> int:
    """The smallest padded cohort whose truncation probability over `rounds` rounds stays
    within `budget` (at most N)."""
    if budget <= 0:
        return population
    size = int(_binom().isf(budget / rounds, population + 1, rate))
    while size < population and rounds * overflow_probability(population, rate, size) > budget:
        size += 1
    return max(1, min(population, size))
