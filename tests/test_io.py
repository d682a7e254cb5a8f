"""Atomic writers: whole files or nothing, shareable permissions, no temp files left behind."""

from __future__ import annotations

import csv
import stat

import pytest

from fedjax_lm.io import atomic_savefig, atomic_write_text, write_csv


def test_write_csv_round_trips_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "out" / "results.csv"
    rows = [{"a": 1, "b": "x,y"}, {"a": 2, "b": "z"}]
    write_csv(path, rows)
    with path.open(newline="") as f:
        assert list(csv.DictReader(f)) == [{"a": "1", "b": "x,y"}, {"a": "2", "b": "z"}]
    write_csv(path, rows[:1], fieldnames=["b", "a"])  # replaces, in the given column order
    assert path.read_text().splitlines() == ["b,a", '"x,y",1']
    assert [p.name for p in path.parent.iterdir()] == ["results.csv"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "table.md"
    atomic_write_text(path, "old\n")
    with pytest.raises(ValueError):
        write_csv(path, [{"a": 1}], fieldnames=["b"])  # DictWriter refuses the unknown key
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["table.md"]


def test_atomic_savefig_writes_a_png_and_closes_the_figure(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    atomic_savefig(fig, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not plt.fignum_exists(fig.number)


def test_write_csv_with_no_rows_writes_nothing_or_just_the_header(tmp_path):
    write_csv(tmp_path / "empty.csv", [])
    assert not (tmp_path / "empty.csv").exists()
    write_csv(tmp_path / "header.csv", [], fieldnames=["a", "b"])
    assert (tmp_path / "header.csv").read_text().splitlines() == ["a,b"]
