"""Privacy accounting: ε is dp-accounting's own number for the run's (q, z, T, δ), reproduces a
published setting, calibration hits its target, and the Poisson padding's tail bound holds."""

import math

import dp_accounting
import numpy as np
import pytest
from scipy import stats

from fedjax_lm.federated import accounting as acc


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_epsilon_equals_dp_accounting_directly(accountant):
    n, m, z, rounds, delta = 1000, 50, 1.1, 40, 1e-4
    setting = acc.PrivacySetting(n, m, z, "poisson", accountant)
    direct = (dp_accounting.rdp.RdpAccountant() if accountant == "rdp"
              else dp_accounting.pld.PLDAccountant())
    direct.compose(dp_accounting.PoissonSampledDpEvent(m / n, dp_accounting.GaussianDpEvent(z)),
                   rounds)
    assert acc.epsilon(setting, rounds, delta) == direct.get_epsilon(delta)
    assert acc.epsilon(setting, 0, delta) == 0.0
    assert acc.epsilon(setting.with_noise(0.0), rounds, delta) == math.inf


# TensorFlow Privacy's tutorial table (tutorials/README.md, "Select Parameters": MNIST, 60,000
# records, batches of 256 Poisson-sampled, delta = 1e-5), computed with the moments
# accountant's RDP -> (eps, delta) conversion over the tutorial's orders. User-level DP-FedAvg
# is the same mechanism with clients as records (McMahan et al. 2018, section 3), so our round
# event must give the same RDP curve; dp-accounting's newer conversion is tighter still.
TUTORIAL_ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))


@pytest.mark.parametrize(("z", "epochs", "published"), [(1.12, 60, 2.92), (1.2, 10, 1.20)])
def test_reproduces_published_tf_privacy_epsilons(z, epochs, published):
    setting = acc.PrivacySetting(60000, 256, z, "poisson", "rdp")
    rounds = epochs * 60000 // 256
    accountant = dp_accounting.rdp.RdpAccountant(TUTORIAL_ORDERS)
    accountant.compose(acc.round_event(setting), rounds)
    rdp = np.asarray(accountant._rdp)  # the RDP curve, for the classic conversion
    classic = np.min(rdp + np.log(1 / 1e-5) / (np.asarray(TUTORIAL_ORDERS) - 1))
    assert classic == pytest.approx(published, abs=0.005)  # the table's two decimals
    assert acc.epsilon(setting, rounds, 1e-5) < published


def test_fixed_sampling_is_replace_one_without_replacement_and_full_cohort_gaussian():
    event = acc.round_event(acc.PrivacySetting(100, 10, 2.0, "fixed"))
    assert event == dp_accounting.SampledWithoutReplacementDpEvent(
        100, 10, dp_accounting.GaussianDpEvent(1.0))  # sensitivity 2·clip under replace-one
    assert acc.make_accountant(acc.PrivacySetting(100, 10, 2.0, "fixed")).neighboring_relation \
        == dp_accounting.NeighboringRelation.REPLACE_ONE
    for sampling in acc.SAMPLINGS:
        full = acc.PrivacySetting(100, 100, 2.0, sampling)
        assert acc.round_event(full) == dp_accounting.GaussianDpEvent(2.0)
    with pytest.raises(ValueError, match="PLD accountant does not analyse sampling without"):
        acc.PrivacySetting(100, 10, 2.0, "fixed", "pld")


def test_calibration_reaches_the_target_and_no_further():
    setting = acc.PrivacySetting(2000, 100, 0.0, "poisson", "rdp")
    rounds, delta, target = 30, 1e-5, 3.0
    z = acc.calibrate_noise(setting, rounds, target, delta)
    assert acc.epsilon(setting.with_noise(z), rounds, delta) <= target
    assert acc.epsilon(setting.with_noise(z - 2 * acc.CALIBRATION_TOL), rounds, delta) > target
    with pytest.raises(ValueError, match=r"target_epsilon 0.001 is out of reach in 30 rounds: "
                                         r"even noise_multiplier 100 gives epsilon"):
        acc.calibrate_noise(setting, rounds, 0.001, delta)


def test_default_delta_and_padding_tail_bound():
    assert acc.default_delta(1000) == 1000 ** -1.1
    n, q, rounds, budget = 1000, 0.1, 50, 1e-9
    size = acc.default_max_cohort(n, q, rounds, budget)
    tail = lambda k: rounds * stats.binom.sf(k, n + 1, q)  # noqa: E731
    assert tail(size) <= budget < tail(size - 1)  # the smallest padding within the budget
    eps = 2.0
    assert acc.overflow_delta(n, q, size, rounds, eps) == pytest.approx(
        (1 + math.exp(eps)) * tail(size))
    assert acc.default_max_cohort(n, q, rounds, 0.0) == n
