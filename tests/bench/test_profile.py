"""The client-step profile: its matmul-only step is exactly the FLOPs the bench counts."""

import pytest

from fedjax_lm.bench import profile
from fedjax_lm.bench.workload import Workload, encoder_config, train_flops_per_token


@pytest.mark.parametrize("model,length", [("tiny", 32), ("mini", 16)])
def test_dense_matmul_step_costs_the_counted_model_flops(model, length):
    w = Workload(model=model, batch_size=2, max_length=length)
    cfg = encoder_config(w)
    fn, args = profile.dense_matmul_step(cfg, w.batch_size, w.max_length)
    xla = fn.lower(*args).compile().cost_analysis()
    xla = xla[0] if isinstance(xla, list) else xla
    counted = train_flops_per_token(cfg, length) * w.batch_size * length
    # XLA also counts the few reductions and adds that keep the products alive (< 2%).
    assert counted <= xla["flops"] <= 1.02 * counted


@pytest.mark.slow
def test_profile_runs_every_variant_and_reports_them(tmp_path):
    assert profile.main(["--model", "tiny", "--batch-size", "2", "--max-length", "8",
                         "--local-steps", "2", "--vmap-clients", "2", "--reps", "1",
                         "--out", str(tmp_path)]) == 0
    text = (tmp_path / "profile_tiny.md").read_text()
    names = ["client step", "no dropout", "tanh GELU", "vmap × 2", "forward only",
             "dense matmuls only", "embedding update only"]
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    assert [r.split(" | ")[0][2:] for r in rows[1:]] == names
    assert rows[1].split(" | ")[2] == "1.00"  # the client step is the reference
    assert "float32 matmul roofline" in text and "GFLOP/s" in text
