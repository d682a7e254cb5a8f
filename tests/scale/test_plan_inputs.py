"""`fedjax-lm plan` refuses flags that cannot describe a round: one stderr line naming the flag
and the fix, exit status 2, before anything compiles (no ZeroDivisionError, OverflowError or
JAX TypeError from deep inside the estimate)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from fedjax_lm import cli
from fedjax_lm.scale import memory as mem

PLAN = ["plan", "--model", "tiny", "--clients", "4"]
SIZE = "is not a finite size of at least 1 byte; give one such as 80GB or 16GiB"

CASES = [
    ([*PLAN, "--device-memory", "inf"], f"--device-memory: memory size 'inf' {SIZE}"),
    ([*PLAN, "--device-memory", "infGB"], f"--device-memory: memory size 'infGB' {SIZE}"),
    ([*PLAN, "--device-memory", "0"], f"--device-memory: memory size '0' {SIZE}"),
    ([*PLAN, "--device-memory=-5GB"], f"--device-memory: memory size '-5GB' {SIZE}"),
    ([*PLAN, "--device-memory", "lots"],
     "--device-memory: cannot read a memory size from 'lots' (try 80GB or 16GiB)"),
    ([*PLAN, "--devices", "0"],
     "--devices must be >= 1, got 0: give how many devices share the clients"),
    ([*PLAN, "--local-steps", "0"],
     "--local-steps must be >= 1, got 0: give the local steps per client and round"),
    ([*PLAN, "--batch-size=-8"],
     "--batch-size must be >= 1, got -8: give the examples per local step"),
    ([*PLAN, "--max-length", "0"], "--max-length must be >= 1, got 0: give the tokens per example"),
    (["plan", "--model", "tiny", "--clients", "0"],
     "--clients must be >= 1, got 0: give the clients per round"),
    ([*PLAN, "--peft", "lora", "--lora-rank", "0"],
     "--lora-rank must be >= 1, got 0: give the rank of the LoRA adapters"),
    ([*PLAN, "--num-labels", "0"],
     "--num-labels must be >= 1, got 0: give the classes of the head"),
    ([*PLAN, "--freeze-layers", "-1"],
     "--freeze-layers must be >= 0, got -1: give how many bottom layers to freeze (0: none)"),
    ([*PLAN, "--headroom", "nan"],
     "--headroom is the fraction of memory to plan for, in (0, 1]; got nan"),
]


@pytest.mark.parametrize("argv,line", CASES, ids=[" ".join(c[0][5:]) for c in CASES])
def test_bad_plan_flag_is_one_line_exit_2(argv, line, capsys):
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err == f"fedjax-lm plan: error: {line}\n"
    assert captured.out == ""


def test_sweep_vectorize_memory_inf_is_one_line(tmp_path: Path, capsys):
    argv = ["sweep", "--out-dir", str(tmp_path / "s"), "--no-progress", "--vectorize",
            "--vectorize-memory=inf"]
    assert cli.main(argv) == 2
    assert capsys.readouterr().err == f"fedjax-lm sweep: error: vectorize: memory: memory size " \
                                      f"'inf' {SIZE}\n"


@pytest.mark.parametrize("text", ["inf", "-inf", "nan", "infGB", "0", "0.5", "-1GB", "1e400"])
def test_parse_bytes_refuses_non_finite_and_non_positive(text):
    with pytest.raises(ValueError, match=r"not a finite size of at least 1 byte"):
        mem.parse_bytes(text)


def test_parse_bytes_still_reads_sizes():
    assert mem.parse_bytes("1") == 1 and mem.parse_bytes("2KiB") == 2048
    assert mem.parse_bytes("80GB") == 80 * 10**9 and not math.isinf(mem.parse_bytes("1e30"))
