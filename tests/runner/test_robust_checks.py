"""The robust aggregators' config checks: Krum's n > 2f+2 must hold in every round, so a
Poisson cohort (no minimum size) is refused up front with one line naming the fix."""

import dataclasses

import pytest

from fedjax_lm import federated as fl
from fedjax_lm.grid import ConfigError
from fedjax_lm.runner.config import RunConfig
from fedjax_lm.runner.robustness import check_robustness


def _cfg(**kw) -> RunConfig:
    return dataclasses.replace(RunConfig(), clients=20, cohort_size=5, **kw)


@pytest.mark.parametrize("aggregator,f", [("krum", 1), ("multi_krum", 0)])
def test_krum_with_poisson_sampling_is_refused_naming_the_fix(aggregator, f):
    cfg = _cfg(aggregator=aggregator, byzantine=f, sampling="poisson")
    with pytest.raises(ConfigError) as e:
        check_robustness(cfg, fl.ExecutorConfig())
    assert str(e.value) == (
        f"aggregator {aggregator} needs more than 2f+2 = {2 * f + 2} clients in every round, "
        "and a Poisson cohort can be smaller (it has no minimum size): use --sampling fixed")


def test_krum_with_fixed_sampling_and_other_rules_with_poisson_pass():
    check_robustness(_cfg(aggregator="krum", byzantine=1), fl.ExecutorConfig())
    for name in ("median", "trimmed_mean", "geometric_median", "mean"):
        check_robustness(_cfg(aggregator=name, sampling="poisson"), fl.ExecutorConfig())
