"""Planned vs measured memory: which bench rows are compared, and that the planned column is
the compiled chunk program of exactly that cell."""

from __future__ import annotations

import json

import jax
import optax
import pytest

from fedjax_lm.bench import planned
from fedjax_lm.bench.workload import Workload, encoder_config
from fedjax_lm.models import Model, classification_loss
from fedjax_lm.scale import memory as mem
from fedjax_lm.scale import targets


def _row(**kw):
    row = dict(model="tiny", label="vmap@2", backend="vmap", clients=4, chunk=2, dtype="float32",
               optimizer="sgd", attention_impl="xla", remat=False, batch_size=4, local_steps=2,
               max_length=16, peak_mem_bytes=10**9, peak_mem_kind="device_peak", error=None)
    return {**row, **kw}


def test_only_vectorized_cells_with_their_own_peak_are_compared():
    rows = [_row(), _row(backend="loop", label="loop"), _row(peak_mem_kind="device_peak_bound"),
            _row(peak_mem_kind="host_rss"), _row(error="OOM", peak_mem_bytes=None),
            _row(chunk=None, label="vmap", peak_mem_kind="device_peak_in_process")]
    assert [r["label"] for r in planned.measured_cells(rows)] == ["vmap@2", "vmap"]


@pytest.mark.slow
def test_planned_column_is_the_cells_compiled_chunk_program(tmp_path, capsys):
    row = _row()
    w = Workload("tiny", 4, 2, 4, 16)
    model = Model(encoder_config(w))
    params = jax.eval_shape(model.init, jax.random.key(0))
    expect = mem.compiled_chunk_bytes(classification_loss(model), params, optax.sgd(0.01),
                                      mem.text_batch(2, 4, 16), 2)
    assert planned.planned_bytes(row, None) == (expect, mem.tree_bytes(params))

    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"rows": [row, _row(backend="loop", label="loop")]}))
    out = tmp_path / "planned.md"
    assert planned.main([str(bench), "--out", str(out)]) == 0
    table = out.read_text()
    assert capsys.readouterr().out == table
    lines = [x for x in table.splitlines() if x.startswith("| tiny")]
    assert lines == [f"| tiny float32 sgd | vmap@2 | 4 | {mem.format_bytes(10**9)} | "
                     f"{mem.format_bytes(expect)} | {mem.format_bytes(10**9 - expect)} "
                     f"({(10**9 - expect) / 10**9:+.1%}) | "
                     f"{mem.format_bytes(mem.tree_bytes(params))} |"]
    assert table.startswith(f"Planned for: local ({targets.local_target().description})")


def test_bad_input_is_an_error_line(tmp_path, capsys):
    assert planned.main([str(tmp_path / "missing.json")]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"no_rows": []}))
    assert planned.main([str(bad)]) == 2
    assert "error: 'rows'" in capsys.readouterr().err
