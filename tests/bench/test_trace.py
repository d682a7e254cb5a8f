"""Kernel names → kinds, and the per-round arithmetic of a traced breakdown."""

from __future__ import annotations

import pytest

from fedjax_lm.bench.trace import breakdown, kind_of


@pytest.mark.parametrize("name,kind", [
    ("nvjet_hsh_256x128_64x4_1x2_h_bz_coopA_NNT", "matmul"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "matmul"),
    ("gemm_fusion_dot_12", "matmul"),
    ("dot.269", "matmul"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop", "fused attention"),
    ("input_reduce_fusion_3", "reduction"),
    ("loop_transpose_fusion", "copy / transpose"),
    ("MemcpyD2D", "copy / transpose"),
    ("loop_xor_fusion_2", "random bits"),
    ("loop_multiply_fusion_7", "elementwise fusion"),
    ("broadcast_add_fusion.15", "elementwise fusion"),
    ("custom-call.4", "other"),
])
def test_kernel_kinds(name, kind):
    assert kind_of(name) == kind


def test_breakdown_is_per_round_and_sums_to_busy_time():
    events = [("nvjet_a", 0.004), ("nvjet_a", 0.004), ("loop_add_fusion", 0.001),
              ("input_reduce_fusion", 0.003), ("nvjet_b", 0.002)]
    b = breakdown(events, rounds=2, wall_s=0.02, top=2)
    assert b["busy_s_per_round"] == pytest.approx(0.007)
    assert b["busy_fraction"] == pytest.approx(0.7)
    assert b["kinds_s_per_round"] == pytest.approx(
        {"matmul": 0.005, "reduction": 0.0015, "elementwise fusion": 0.0005})
    assert list(b["kinds_s_per_round"]) == ["matmul", "reduction", "elementwise fusion"]
    assert [k["name"] for k in b["top_kernels"]] == ["nvjet_a", "input_reduce_fusion"]
    assert b["top_kernels"][0]["calls_per_round"] == 1.0
    assert b["top_kernels"][0]["s_per_round"] == pytest.approx(0.004)
