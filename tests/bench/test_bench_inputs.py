"""`fedjax-lm bench` refuses flags no cell could measure (one stderr line naming the flag and
the fix, exit status 2, before any compile), and a run in which every cell failed exits 1
with one line saying so, not 0."""

from __future__ import annotations

from pathlib import Path

import jax
import pytest

from fedjax_lm import cli
from fedjax_lm.bench import grid as g
from fedjax_lm.bench import run

ONE = "give client counts such as --clients 1,2,4"
CASES = [
    (["--backends", "vmapp"],
     "--backends: bad backend spec 'vmapp': use one of loop, vmap, mesh, pmap, optionally @K "
     "(clients_per_chunk, host executor) or @Ks (scan executor)"),
    (["--backends", "vmap@0"],
     "--backends: bad backend spec 'vmap@0': the chunk width K of vmap@K is the clients per "
     "chunk, >= 1; use vmap@1 or more, or vmap"),
    (["--backends", "loop@2"],
     "--backends: loop does not take a chunk width ('loop@2'); use loop alone, or vmap@K / mesh@K"),
    (["--backends", ","], "--backends lists no backend: give some of loop,vmap,mesh,pmap"),
    (["--backends", "loop", "--peft", "lora", "--peers", "flower"],
     "the peers fine-tune every parameter; run --peft without --peers"),
    (["--backends", "loop", "--dtype", "float16x"],
     "argument --dtype: invalid choice: 'float16x' (choose from 'float32', 'bfloat16') "
     "(see fedjax-lm bench --help)"),
    (["--backends", "loop", "--clients", "0"], f"--clients must be >= 1 each, got 0: {ONE}"),
    (["--backends", "loop", "--clients", ","],
     "--clients lists no client count: give some, e.g. --clients 1,2,4"),
    (["--backends", "loop", "--clients", "a"],
     "argument --clients: invalid comma-separated int value: 'a' (see fedjax-lm bench --help)"),
    (["--backends", "loop", "--rounds", "0"],
     "--rounds must be >= 1, got 0: give the steady rounds timed after the first"),
    (["--backends", "loop", "--batch-size", "0"],
     "--batch-size must be >= 1, got 0: give the examples per local step"),
    (["--backends", "loop", "--max-length", "0"],
     "--max-length must be >= 1, got 0: give the tokens per example"),
    (["--backends", "loop", "--max-length", "1000"],
     "--max-length 1000 exceeds model tiny's 128 positions; use --max-length 128 or less"),
    (["--backends", "loop", "--local-steps", "0"],
     "--local-steps must be >= 1, got 0: give the local steps per client and round"),
    (["--backends", "loop", "--chunk", "0"],
     "--chunk must be >= 1, got 0: give the clients per chunk, or leave it out"),
    (["--backends", "loop", "--peers", "torchloop"],
     "unknown peer 'torchloop' in --peers; valid: torch-loop, flower, pfl"),
    (["--backends", "loop", "--peers", "flower", "--peer-clients", "0"],
     "--peer-clients must be >= 1 each, got 0: give client counts such as --peer-clients 1,2,4"),
    (["--backends", "loop", "--peer-timeout", "nan"],
     "--peer-timeout must be a number of seconds > 0, got nan"),
    (["--backends", "loop", "--peft", "lora", "--lora-rank", "0"],
     "--lora-rank must be >= 1, got 0: give the rank of the LoRA adapters"),
    (["--backends", "loop", "--peft", "lora", "--lora-targets", "foo"],
     "unknown LoRA target(s) foo; valid: query, key, value, attention_output, intermediate, "
     "output"),
    (["--preset", "cpu", "--rounds", "0"],
     "--rounds must be >= 1, got 0: give the steady rounds timed after the first"),
]


def _code(argv: list[str]) -> int:
    """`fedjax-lm ARGV`'s exit status (argparse exits itself on a usage error)."""
    try:
        return cli.main(argv)
    except SystemExit as e:
        return e.code


@pytest.mark.parametrize("flags,line", CASES, ids=[" ".join(c[0]) for c in CASES])
def test_bad_bench_flag_is_one_line_exit_2(flags, line, tmp_path: Path, capsys):
    argv = ["bench", "--model", "tiny", "--clients", "2", *flags, "--out", str(tmp_path / "b")]
    assert _code(argv) == 2
    captured = capsys.readouterr()
    assert captured.err == f"fedjax-lm bench: error: {line}\n"
    assert captured.out == "" and not (tmp_path / "b").exists()


def test_python_m_bench_refuses_bad_input_in_one_line_too(tmp_path: Path, capsys):
    assert run.main(["--backends", "vmapp", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m fedjax_lm.bench: error: --backends: bad backend spec 'vmapp'")
    assert err.count("\n") == 1


def test_parse_backend_refuses_a_chunk_below_one():
    with pytest.raises(ValueError, match=r"'mesh@0s': the chunk width K of mesh@K is the "
                                         r"clients per chunk, >= 1"):
        g.parse_backend("mesh@0s")


@pytest.fixture
def compilation_cache():
    """run_bench turns JAX's compilation cache off for the process; restore it."""
    before = jax.config.jax_enable_compilation_cache
    yield
    jax.config.update("jax_enable_compilation_cache", before)


def test_every_cell_failed_exits_1_with_one_line(tmp_path: Path, capsys, monkeypatch,
                                                 compilation_cache):
    def failing(group, args, rooflines):
        return [{**run._cell_base(group, s, c), "status": "failed",
                 "error": "ValueError: cannot reshape\narray"}
                for s in group.specs() for c in group.clients]

    monkeypatch.setattr(run, "run_group", failing)
    monkeypatch.setattr("fedjax_lm.bench.measure.matmul_roofline", lambda dtype: 1e9)
    out = tmp_path / "b"
    argv = ["bench", "--model", "tiny", "--clients", "1,2", "--backends", "loop",
            "--out", str(out)]
    assert cli.main(argv) == 1
    captured = capsys.readouterr()
    assert captured.err == (f"fedjax-lm bench: error: every cell failed (2 cells; first: "
                            f"ValueError: cannot reshape array); see {out / 'report.md'}\n")
    assert (out / "bench.json").exists()  # the failed run is still written down
