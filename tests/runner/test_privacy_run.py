"""A DP run end to end: Poisson cohorts padded to a fixed size, ε per round equal to the
accountant's, adaptive clip in the checkpointed state, and a resumed run bitwise identical."""

from pathlib import Path

import pytest

from fedjax_lm.federated import accounting
from fedjax_lm.grid import ResumeError
from fedjax_lm.io import read_jsonl
from fedjax_lm.runner import RunConfig, train

DP = dict(task="synthetic", model="preset:tiny", max_train_examples=96, max_test_examples=48,
          max_length=16, batch_size=8, local_epochs=1, lr=0.05, clients=6, cohort_size=3,
          sampling="poisson", max_cohort_size=5, dp_clip=0.5, dp_noise_multiplier=0.8,
          dp_clip_quantile=0.5, dp_count_stddev=1.0, dp_delta=1e-3, client_optimizer="adam",
          carry_client_state=True)


def _cfg(out: Path, rounds: int, **kw) -> RunConfig:
    return RunConfig(**{**DP, "rounds": rounds, "out": str(out), **kw})


@pytest.mark.slow
def test_dp_poisson_run_reports_epsilon_and_resumes_bitwise(tmp_path):
    straight = train(_cfg(tmp_path / "straight", 4), progress=False)
    train(_cfg(tmp_path / "resumed", 2), progress=False)
    resumed = train(_cfg(tmp_path / "resumed", 4), progress=False)  # continues from round 2
    assert (straight["params_sha256"], straight["client_state_sha256"]) == (
        resumed["params_sha256"], resumed["client_state_sha256"])
    a = read_jsonl(tmp_path / "straight" / "metrics.jsonl")
    b = read_jsonl(tmp_path / "resumed" / "metrics.jsonl")
    keys = ("epsilon", "dp_clip", "cohort_size", "truncated_clients", "train_loss")
    assert [[r[k] for k in keys] for r in a] == [[r[k] for k in keys] for r in b]
    setting = accounting.PrivacySetting(6, 3, 0.8, "poisson", "rdp")
    assert [r["epsilon"] for r in a] == [accounting.epsilon(setting, t, 1e-3)
                                         for t in (1, 2, 3, 4)]
    assert straight["epsilon"] == a[-1]["epsilon"] == resumed["epsilon"]
    assert straight["dp_noise_multiplier_used"] == 0.8 and straight["dp_delta"] == 1e-3
    assert len({r["dp_clip"] for r in a}) > 1  # the adaptive clip moved
    assert all(0 <= r["cohort_size"] <= 5 for r in a)
    # The truncation bound: P(Binomial(7, 1/2) > 5) = 8/128 per round, over 4 rounds.
    import math
    assert straight["dp_overflow_delta"] == pytest.approx(
        (1 + math.exp(straight["epsilon"])) * 4 * 8 / 128)


@pytest.mark.slow
def test_calibrated_run_refuses_to_change_its_rounds_on_resume(tmp_path):
    cfg = _cfg(tmp_path / "run", 1, dp_noise_multiplier=None, target_epsilon=8.0,
               dp_clip_quantile=None, sampling="fixed", max_cohort_size=None)
    final = train(cfg, progress=False)
    assert final["epsilon"] <= 8.0
    with pytest.raises(ResumeError, match=r"noise multiplier \(calibrated for target_epsilon\) "
                                          r"was set for its 1 rounds; --rounds 2 would change"):
        train(cfg.replace(rounds=2), progress=False)
