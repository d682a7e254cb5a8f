"""The bench end to end on the tiny model: fields, exact throughput arithmetic, compile counts,
the roofline, and a peer that cannot run (a row with the reason, not a crash)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedjax_lm.bench import FIELDS, run
from fedjax_lm.bench.grid import parse_backend
from fedjax_lm.bench.measure import matmul_roofline
from fedjax_lm.bench.peers import run_peer


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("bench")
    missing = out / "no-such-venv" / "python"
    import os

    os.environ["FEDJAX_LM_PEERS_PYTHON"] = str(missing)
    try:
        rc = run.main(["--model", "tiny", "--clients", "1,2", "--backends", "loop,vmap",
                       "--rounds", "2", "--local-steps", "2", "--batch-size", "4",
                       "--max-length", "16", "--peers", "torch-loop", "--trace", "1",
                       "--out", str(out)])
    finally:
        del os.environ["FEDJAX_LM_PEERS_PYTHON"]
    assert rc == 0
    return json.loads((out / "bench.json").read_text()), out


def test_rows_have_every_field_and_exact_throughput(bench):
    result, _ = bench
    ours = [r for r in result["rows"] if not r["label"].startswith("peer:")]
    assert {(r["backend"], r["clients"]) for r in ours} == {
        ("loop", 1), ("loop", 2), ("vmap", 1), ("vmap", 2)}
    for r in ours:
        assert r["status"] == "ok"
        assert set(FIELDS) <= set(r)
        assert r["round_s"] > 0 and r["compile_s"] >= 0
        assert r["examples_per_s"] == r["clients"] * 2 * 4 / r["round_s"]
        assert r["tokens_per_s"] == r["clients"] * 2 * 4 * 16 / r["round_s"]
        assert 0 < r["roofline_fraction"] == r["flops_per_s"] / r["roofline_flops_per_s"]
        assert r["peak_mem_bytes"] > 0
        assert r["compiles"] >= 0 and r["steady_compiles"] == 0  # rounds never recompile
    first = {r["backend"]: r for r in ours if r["clients"] == 1}
    assert first["vmap"]["compiles"] >= 1  # the round program itself
    loop2 = next(r for r in ours if r["backend"] == "loop" and r["clients"] == 2)
    assert loop2["step_executables"] == 1  # one client step serves every C
    assert result["machine"]["cpu_count"] >= 1 and len(result["loadavg_start"]) == 3


def test_missing_peer_is_a_row_with_the_reason(bench):
    result, out = bench
    peer = [r for r in result["rows"] if r["label"] == "peer:torch-loop"]
    assert len(peer) == 2 and all(r["status"] == "failed" for r in peer)
    assert "peers venv python not found" in peer[0]["error"]
    report = (out / "report.md").read_text()
    assert "peers venv python not found" in report and "## Targets" in report
    assert (out / "bench.png").read_bytes()[:4] == b"\x89PNG"


def test_unknown_peer_and_crashing_peer(tmp_path: Path):
    bad = run_peer("nope", {}, clients=1, rounds=1, local_steps=1, batch_size=1,
                   max_length=4, optimizer="sgd", timeout_s=10)
    assert bad["status"] == "failed" and "unknown peer" in bad["error"]
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho 'ImportError: no torch here' >&2\nexit 3\n")
    fake.chmod(0o755)
    res = run_peer("torch-loop", {}, clients=1, rounds=1, local_steps=1, batch_size=1,
                   max_length=4, optimizer="sgd", timeout_s=10, python=fake)
    assert res["status"] == "failed" and res["error"] == "exit status 3"
    assert "no torch here" in res["stderr_tail"]


def test_roofline_is_positive():
    assert matmul_roofline("float32", n=256, reps=2) > 0


def test_backend_specs():
    assert parse_backend("vmap@8").chunk == 8 and parse_backend("vmap@8").executor == "host"
    assert parse_backend("mesh@4s").executor == "scan"
    with pytest.raises(ValueError, match="bad backend spec"):
        parse_backend("vmapp")
    with pytest.raises(ValueError, match="does not take a chunk"):
        parse_backend("loop@2")


def _row(model, clients, label, round_s, **kw):
    flops = 100e9 * clients  # per round; the roofline is 100 GFLOP/s
    return {"status": "ok", "model": model, "clients": clients, "label": label,
            "round_s": round_s, "flops_per_s": flops / round_s, "roofline_flops_per_s": 100e9,
            "roofline_fraction": flops / round_s / 100e9, **kw}


def test_targets_read_the_rows_as_the_issue_states_them():
    from fedjax_lm.bench.report import evaluate_targets
    from fedjax_lm.bench.run import _add_ratios

    rows = [
        _row("tiny", 8, "loop", 1.0), _row("tiny", 8, "vmap", 0.5),
        _row("tiny", 8, "vmap@8", 0.25, chunk_executor="host", step_executables=1),
        _row("tiny", 8, "peer:flower", 2.0),
        _row("mini", 8, "loop", 4.0), _row("mini", 8, "vmap", 5.0), _row("mini", 8, "vmap@1s", 3.2,
                                                                         steady_compiles=1),
        _row("mini", 8, "peer:torch-loop", 6.4),
    ]
    _add_ratios(rows)
    got = {t["target"].split(" (")[0]: t for t in evaluate_targets(rows)}
    every = got["vectorized >= 1.0x loop in every cell"]
    assert every["value"] == pytest.approx(1.25) and every["status"] == "met"  # mini: 4.0/3.2
    assert "mini C=8, best there vmap@1s" in every["detail"]
    plain = got["plain vmap"]
    assert plain["value"] == pytest.approx(0.8) and plain["status"] == "missed"
    assert got[">= 3x loop where dispatch-bound"]["value"] == pytest.approx(4.0)
    flower = got[">= 5.0x faster per round than flower"]
    assert flower["status"] == "not measured"  # flower ran at C=8, the target is C=32
    torch = got[">= 1.3x faster per round than torch-loop"]
    assert torch["value"] == pytest.approx(2.0) and torch["status"] == "met"
    roof = got[">= 70% of the matmul roofline"]
    assert roof["value"] == pytest.approx(8 / 3.2) and "vmap@1s" in roof["detail"]
    steady = got["never recompiles across rounds"]
    assert steady["status"] == "missed" and steady["detail"] == "mini vmap@1s C=8"


def test_trace_breaks_each_cell_down_and_the_report_shows_it(bench):
    result, out = bench
    for r in (r for r in result["rows"] if r["status"] == "ok"):
        t = r["trace"]
        assert t["rounds"] == 1 and t["source"] == "XLA:CPU ops on host threads"
        assert t["busy_s_per_round"] == pytest.approx(sum(t["kinds_s_per_round"].values()))
        assert t["busy_s_per_round"] > 0 and t["top_kernels"]
    assert "## Where the time goes" in (out / "report.md").read_text()


def test_accelerator_targets_and_the_largest_c_that_fit():
    from fedjax_lm.bench.report import evaluate_targets
    from fedjax_lm.bench.run import _add_ratios

    rows = [_row("tiny", 32, "loop", 1.2), _row("tiny", 32, "vmap", 0.1),
            _row("mini", 32, "loop", 1.0), _row("mini", 32, "vmap", 0.2),
            _row("mini", 32, "vmap+dpa", 0.125),
            _row("base", 32, "vmap@8", 1.0, dtype="bfloat16"),
            _row("base", 32, "vmap", 0.5, dtype="bfloat16", peak_mem_bytes=60 * 2**30),
            _row("base", 40, "vmap", 0.6, dtype="bfloat16", peak_mem_bytes=75 * 2**30),
            {"status": "failed", "model": "base", "clients": 48, "label": "vmap", "oom": True}]
    _add_ratios(rows)
    assert not any("accelerator" in t["target"] for t in evaluate_targets(rows))  # CPU run
    got = {t["target"]: t for t in evaluate_targets(rows, accelerator=True)}
    tiny, mini = got[">= 10x loop at C=32 (tiny, accelerator)"], got[
        ">= 10x loop at C=32 (mini, accelerator)"]
    assert tiny["value"] == pytest.approx(12.0) and tiny["status"] == "met"
    assert mini["value"] == pytest.approx(8.0) and mini["status"] == "missed"
    assert mini["detail"] == "best: vmap+dpa"
    mfu = next(t for t in got.values() if t["target"].startswith(">= 40% bf16 MFU"))
    # 100 GFLOP per client / 0.6 s at C=40 against the 100 GFLOP/s roofline
    assert mfu["value"] == pytest.approx(40 / 0.6) and "vmap C=40" in mfu["detail"]
    largest = next(t for t in got.values() if t["target"].startswith("largest unchunked C"))
    assert largest["value"] == 40
    assert largest["detail"] == "peak 75.0 GiB at C=40; out of memory at C=48"


def test_a_search_group_skips_client_counts_past_an_earlier_oom():
    from fedjax_lm.bench.grid import Group
    from fedjax_lm.bench.run import cell_label, skip_past_oom

    search = Group("base", 128, (48, 56, 64), ("vmap",), stop_at_oom=True)
    oom = {"model": "base", "label": "vmap", "clients": 56, "oom": True}
    assert skip_past_oom(search, [oom]).clients == (48,)
    assert skip_past_oom(search, [{**oom, "label": "vmap@8"}]).clients == (48, 56, 64)
    assert skip_past_oom(search, [{**oom, "clients": 40}]).clients == ()
    plain = Group("base", 128, (48, 56), ("vmap",))
    assert skip_past_oom(plain, [oom]).clients == (48, 56)  # only search groups skip
    dpa = Group("base", 128, (8,), ("vmap@16",), attention_impl="dot_product", remat=True)
    assert cell_label(dpa, dpa.specs()[0]) == "vmap@16+dpa+remat"


def test_a_cells_device_peak_is_its_own_only_where_it_raised_the_process_peak():
    from fedjax_lm.bench.measure import device_cell_peak
    from fedjax_lm.bench.report import _mem_mib

    assert device_cell_peak(2 * 2**30, 3 * 2**30) == (3 * 2**30, "device_peak")
    assert device_cell_peak(3 * 2**30, 3 * 2**30) == (3 * 2**30, "device_peak_bound")
    assert _mem_mib({"peak_mem_bytes": 3 * 2**30, "peak_mem_kind": "device_peak"}) == "3072"
    assert _mem_mib({"peak_mem_bytes": 3 * 2**30, "peak_mem_kind": "device_peak_bound"}) == (
        "≤ 3072")
    assert _mem_mib({"peak_mem_bytes": 2**20, "peak_mem_kind": "host_rss"}) == "1"
    assert _mem_mib({}) == "—"


def test_presets_parse_and_the_largest_c_search_is_per_card():
    from fedjax_lm.bench.grid import PRESETS

    for groups in PRESETS.values():
        for group in groups:
            assert group.specs()  # every backend spec parses
    for card, clients in (("h200", [64, 70, 71, 72]), ("h100", [32, 39, 40, 41])):
        groups = PRESETS[f"gpu-largest-c-{card}"]
        assert [c for g in groups for c in g.clients] == clients
        assert all(g.stop_at_oom and g.backends == ("vmap",) and g.model == "base"
                   for g in groups)
    # LoRA's search brackets the H200 plan's edge (456 fits, 457 does not:
    # benchmarks/results/plan-h200-peft/); C = 2,048 runs in the planner's chunks of 256.
    lora = [c for g in PRESETS["gpu-peft-largest-c-h200"] for c in g.clients]
    assert 456 in lora and max(lora) > 456 and min(lora) < 456
    for groups in (PRESETS["gpu-peft-largest-c-h200"], PRESETS["gpu-peft-2048"]):
        assert all(g.peft == "lora" and g.optimizer == "adam" and g.max_length == 128
                   and g.model == "base" for g in groups)
    (wide,) = PRESETS["gpu-peft-2048"]
    assert wide.clients == (2048,) and wide.specs()[0].chunk == 256


@pytest.mark.slow
def test_a_lora_cell_counts_frozen_flops_and_the_bytes_a_client_sends(tmp_path: Path):
    from fedjax_lm.bench.workload import Workload, encoder_config, train_flops_per_token

    rc = run.main(["--model", "tiny", "--clients", "1", "--backends", "vmap", "--rounds", "1",
                   "--local-steps", "1", "--batch-size", "2", "--max-length", "8",
                   "--peft", "lora", "--lora-rank", "2", "--out", str(tmp_path)])
    assert rc == 0
    (row,) = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert row["label"] == "vmap+lora2" and row["peft"] == "lora"
    # preset:tiny: 2 layers, hidden 64; query and value adapters, the 2-class head.
    assert row["upload_bytes_per_client"] == 2 * 2 * 2 * (64 + 64) * 4 + (64 * 2 + 2) * 4
    cfg = encoder_config(Workload("tiny", peft="lora", lora_rank=2))
    assert row["flops_per_round"] == train_flops_per_token(cfg, 8, frozen_body=True) * 2 * 8
    assert "| vmap+lora2 | 1 |" in (tmp_path / "report.md").read_text()
    with pytest.raises(ValueError, match="the peers fine-tune every parameter"):
        run.main(["--peft", "lora", "--peers", "torch-loop", "--out", str(tmp_path)])


def test_peers_are_swept_and_compared_at_their_best_setting():
    from fedjax_lm.bench.peers import peer_settings, setting_label
    from fedjax_lm.bench.report import evaluate_targets, render_markdown
    from fedjax_lm.bench.run import _add_ratios

    assert peer_settings("flower", 2) == (
        {"actors": 1, "threads": 1}, {"actors": 1, "threads": 2},
        {"actors": 2, "threads": 1}, {"actors": 2, "threads": 2})
    assert peer_settings("pfl", 1) == ({"workers": 1, "threads": 1},)
    assert peer_settings("pfl", 2)[-1] == {"workers": 2, "threads": 1}
    assert peer_settings("torch-loop", 4) == ({"threads": 1}, {"threads": 4})
    assert setting_label({"actors": 2, "threads": 1}) == "actors=2,threads=1"
    rows = [
        _row("tiny", 32, "vmap", 0.25),
        _row("tiny", 32, "peer:flower", 4.0, peer_setting="actors=1,threads=2"),
        _row("tiny", 32, "peer:flower", 1.0, peer_setting="actors=2,threads=1", peer_best=True),
    ]
    _add_ratios(rows)
    assert rows[0]["peer_round_ratio"] == {"flower": 0.25}  # against the best setting
    got = {t["target"]: t for t in evaluate_targets(rows)}
    flower = got[">= 5.0x faster per round than flower (tiny, C=32)"]
    assert flower["value"] == pytest.approx(4.0) and flower["status"] == "missed"
    assert "actors=2,threads=1" in flower["detail"]
    md = render_markdown({"machine": {"hostname": "h", "cpu": "c", "cpu_count": 2, "jax": "x",
                                      "jax_backend": "cpu", "device_kind": "cpu",
                                      "devices": ["d"]},
                          "loadavg_start": (0, 0, 0), "loadavg_end": (0, 0, 0), "started": "t",
                          "wall_s": 1.0, "roofline_flops_per_s": {}, "rounds": 1,
                          "rows": [{**r, "batch_size": 8, "max_length": 32, "local_steps": 4,
                                    "optimizer": "sgd", "dtype": "float32", "compile_s": 0.0,
                                    "examples_per_s": 1.0, "tokens_per_s": 1.0} for r in rows]},
                         "bench.png")
    assert "## The peers at their best" in md
    assert "| tiny | 32 | flower | **actors=2,threads=1** | 1.000 | 1.00 | vmap 0.250 s | 0.250 |" \
        in md
    assert "| tiny | 32 | flower | actors=1,threads=2 | 4.000 | 4.00 |  |  |" in md
