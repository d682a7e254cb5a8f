"""Bad inputs a new user meets, table-driven: for each, `fedjax-lm` exits 2 with one stderr line
naming the cause and the fix, never a traceback, and (where the fix is a new command) the
corrected command then works in the same --out.

Most cases fail before any training, in-process (`cli.main`); those that train use the tiny
preset (a few seconds each with the persistent compilation cache); Ctrl-C runs a real process.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

TINY = ["--model", "preset:tiny", "--task", "synthetic", "--max-train-examples", "96",
        "--max-test-examples", "48", "--max-length", "16", "--batch-size", "8",
        "--local-epochs", "1", "--rounds", "1", "--no-progress"]
BERT = Path(__file__).resolve().parent / "fixtures" / "parity" / "bert"


def _csv(labels: list, header: str = "text,label") -> str:
    return header + "\n" + "".join(f"review number {i},{label}\n" for i, label in enumerate(labels))


GOOD_CSV = _csv([0, 1] * 40)


@dataclass(frozen=True)
class Case:
    """`argv` / `fix` may use {tmp} (a fresh folder) and {out} ({tmp}/run); `files` are written
    under {tmp} first; `fix` (the corrected command) must then succeed in the same --out."""

    id: str
    argv: list[str]
    error: str  # regex searched in the one stderr line, after "fedjax-lm <command>: error: "
    files: dict[str, str] = field(default_factory=dict)
    fix: list[str] | None = None
    env: dict[str, str] = field(default_factory=dict)
    setup: Callable[[Path], None] | None = None


def _model_folder(config: dict) -> Callable[[Path], None]:
    def make(tmp: Path) -> None:
        folder = tmp / "model"
        shutil.copytree(BERT, folder)
        cfg = json.loads((folder / "config.json").read_text()) | config
        (folder / "config.json").write_text(json.dumps(cfg))

    return make


def _not_writable(tmp: Path) -> None:
    (tmp / "locked").mkdir()
    (tmp / "locked").chmod(0o500)


CSV = ["--task", "csv", "--train-file", "{tmp}/train.csv", *TINY[4:]]  # TINY minus the task

CASES = [
    # -- flags and config values that used to fail deep inside the run (or not at all)
    Case("seed_negative", [*TINY, "--seed", "-1"], r"seed must be in \[0, 4294967294\], got -1",
         fix=[*TINY, "--seed", "0"]),
    Case("alpha_inf", [*TINY, "--partition", "dirichlet", "--alpha", "inf"],
         r"alpha must be a finite number, got 'inf'",
         fix=[*TINY, "--partition", "dirichlet", "--alpha", "0.5"]),
    Case("hidden_act_unknown", [*TINY, "--hidden-act", "swishy"],
         r"unknown hidden_act 'swishy'; valid: gelu, .*abu"),
    Case("natural_without_authors", [*TINY, "--partition", "natural"],
         r"partition natural needs a task .*: blog10, blog50; task 'synthetic' has none: use "
         r"another partition"),
    Case("eval_batch_size_zero", [*TINY, "--eval-batch-size", "0"],
         r"eval_batch_size must be >= 1, got 0", fix=[*TINY, "--eval-batch-size", "16"]),
    Case("model_tiny", [*TINY, "--model", "tiny"],
         r"model 'tiny' is neither a folder nor a named model; .* use --model preset:tiny",
         fix=TINY),
    Case("model_preset_unknown", [*TINY, "--model", "preset:huge"],
         r"unknown model preset 'huge'; valid: preset:tiny, preset:mini"),
    Case("model_type_unknown", [*TINY, "--model-type", "roberta"],
         r"model_type must be one of bert, distilbert, albert, got 'roberta'"),
    Case("max_train_examples_zero", [*TINY, "--max-train-examples", "0"],
         r"max_train_examples must be >= 1 \(or unset\), got 0"),
    Case("clients_not_int", [*TINY, "--clients", "four"], r"clients must be int, got 'four'"),
    Case("num_labels_on_builtin_task", [*TINY, "--num-labels", "3"],
         r"num_labels / label_names pin the classes of task csv; .* unset them"),
    Case("set_bad_yaml", [*TINY, "--set", "lr=["], r"override 'lr=\[': '\[' is not a valid YAML "
         r"value \(quote it"),
    Case("unknown_flag", [*TINY, "--rouds", "3"],
         r"unrecognized arguments: --rouds 3 \(see fedjax-lm --help\)"),
    Case("preset_not_yaml", [*TINY, "--config", "{tmp}/bad.yaml"],
         r"bad\.yaml is not valid YAML: .*\(line \d+, column \d+\)",
         files={"bad.yaml": "base: [1,\n"}),
    Case("config_json_heads", [*TINY, "--model", "{tmp}/model"],
         r"model/config\.json: hidden_size 32 is not a multiple of num_attention_heads 5; fix "
         r"that config", setup=_model_folder({"num_attention_heads": 5})),
    Case("config_json_string_size", [*TINY, "--model", "{tmp}/model"],
         r"model/config\.json: hidden_size must be int, got '32'",
         setup=_model_folder({"hidden_size": "32"})),
    Case("max_length_beyond_model", [*TINY, "--model", "minilm", "--max-length", "1000"],
         r"max_length 1000 exceeds model 'minilm''s 512 positions; use --max-length 512"),
    # -- robust aggregation and attacks (issue 17)
    Case("malicious_fraction_half", [*TINY, "--attack", "sign_flip", "--malicious-fraction",
                                     "0.5"],
         r"malicious_fraction must be in \[0, 0\.5\) \(malicious clients are a minority\), "
         r"got 0\.5"),
    Case("krum_too_few_clients", [*TINY, "--aggregator", "krum", "--byzantine", "1"],
         r"aggregator krum with byzantine=1 needs more than 2f\+2 = 4 clients per round, got 4; "
         r"lower --byzantine or raise --cohort-size / --clients",
         fix=[*TINY, "--aggregator", "krum", "--byzantine", "1", "--clients", "6", "--attack",
              "scale", "--malicious-fraction", "0.2"]),
    Case("median_in_chunks", [*TINY, "--aggregator", "median", "--clients-per-chunk", "2"],
         r"^aggregator 'median' needs every client's message at once and cannot run in chunks "
         r"\(clients_per_chunk=2\); unset clients_per_chunk or use backend vmap/mesh/loop$"),
    Case("alie_in_chunks", [*TINY, "--attack", "alie", "--malicious-fraction", "0.2",
                            "--clients-per-chunk", "2"],
         r"aggregator 'mean under alie' needs every client's message at once"),
    Case("trim_fraction_half", [*TINY, "--aggregator", "trimmed_mean", "--trim-fraction", "0.5"],
         r"trim_fraction must be in \[0, 0\.5\), got 0\.5"),
    Case("attack_without_fraction", [*TINY, "--attack", "gaussian"],
         r"attack gaussian needs --malicious-fraction \(e\.g\. 0\.2\)"),
    Case("fraction_without_attack", [*TINY, "--malicious-fraction", "0.2"],
         r"malicious_fraction is set but there is no attack: set --attack"),
    Case("norm_bound_without_bound", [*TINY, "--aggregator", "norm_bound"],
         r"aggregator norm_bound needs the bound: set --norm-bound"),
    # -- parameter-efficient fine-tuning
    Case("lora_target_unknown", [*TINY, "--peft", "lora", "--lora-targets", "query,querry"],
         r"lora_targets querry match no projection; valid: query, key, value, attention_output, "
         r"intermediate, output", fix=[*TINY, "--peft", "lora", "--lora-targets", "query"]),
    Case("lora_target_empty_name", [*TINY, "--peft", "lora", "--lora-targets", "query,,value"],
         r"^lora_targets query,,value has an empty name; list projections separated by single "
         r"commas from: query, key, value, attention_output, intermediate, output$",
         fix=[*TINY, "--peft", "lora", "--lora-targets", "query,value"]),
    Case("lora_flag_without_peft_lora", [*TINY, "--peft", "head", "--lora-rank", "4"],
         r"^--lora-rank needs --peft lora \(got --peft head\); add --peft lora or drop it$"),
    Case("lora_rank_zero", [*TINY, "--peft", "lora", "--lora-rank", "0"],
         r"lora_rank must be >= 1, got 0"),
    Case("lora_rank_beyond_projection", [*TINY, "--peft", "lora", "--lora-rank", "65"],
         r"model 'preset:tiny': lora_rank 65 exceeds projection query's size 64x64; use a rank "
         r"<= 64"),
    Case("lora_flags_without_peft_lora", [*TINY, "--lora-rank", "4", "--lora-dropout", "0.1"],
         r"--lora-rank, --lora-dropout need --peft lora \(got --peft none\); add --peft lora or "
         r"drop them"),
    Case("lora_ranks_above_rank", [*TINY, "--peft", "lora", "--lora-rank", "4",
                                   "--lora-ranks", "2,8"],
         r"lora_ranks must lie in \[1, lora_rank=4\], got 2,8"),
    Case("lora_exact_with_server_optimizer", [*TINY, "--peft", "lora", "--lora-aggregation",
                                              "exact", "--server-optimizer", "fedadam"],
         r"lora_aggregation exact replaces the adapters by the refactored mean product: it needs "
         r"server_optimizer=fedavg, server_lr=1, aggregator=mean and no attack"),
    Case("peft_with_scaffold", [*TINY, "--peft", "bitfit", "--algorithm", "scaffold"],
         r"peft bitfit runs with algorithm fedavg or fedprox, not scaffold"),
    Case("freeze_layers_beyond_model", [*TINY, "--freeze-layers", "3"],
         r"freeze_layers 3 exceeds the model's 2 stored layers; use at most 2"),
    # -- the file system
    Case("out_is_a_file", [*TINY, "--out", "{tmp}/file"],
         r"--out .*/file is a file, not a folder; choose another --out", files={"file": "x"}),
    Case("out_under_a_file", [*TINY, "--out", "{tmp}/file/run"],
         r"--out .*/file/run lies under a file \(.*/file\); choose another --out",
         files={"file": "x"}),
    Case("out_not_writable", [*TINY, "--out", "{tmp}/locked/run"],
         r"cannot be written \(.*/locked is not writable\); choose another --out",
         setup=_not_writable),
    Case("cache_dir_is_a_file", TINY, r"cache directory .*/file is unusable \(File exists\); "
         r"point \$FEDJAX_LM_CACHE_DIR at a writable folder", files={"file": "x"},
         env={"FEDJAX_LM_CACHE_DIR": "{tmp}/file"}, fix=TINY),
    Case("data_dir_missing", [*TINY, "--task", "imdb", "--data-dir", "{tmp}/nowhere"],
         r"data directory .*/nowhere does not exist"),
    Case("train_file_missing", [*CSV, "--train-file", "{tmp}/nope.csv"], r"missing file: .*nope"),
    # -- the user's own files (--task csv)
    Case("csv_typo_label", CSV, r"train\.csv column 'label' has integer labels with a gap "
         r"\(999998 values from 2 to 999999 never occur\): 1000000 \(row 80\); .*--num-labels K",
         files={"train.csv": _csv([0, 1] * 40 + [1000000])}, fix=CSV),
    Case("csv_single_class", CSV, r"has a single class \(1 in all 80 rows\); a classifier needs "
         r"at least 2", files={"train.csv": _csv([1] * 80)}, fix=CSV),
    Case("csv_stray_name", CSV, r"a mix of numbers and names \(mostly numbers\): 'pos' \(row 80\)"
         r"; make every label a number", files={"train.csv": _csv([0, 1] * 40 + ["pos"])}),
    Case("csv_swapped_columns", CSV, r"column 'label' looks like texts or ids, not labels: 80 "
         r"distinct values in 80 rows .*check --label-column / --text-column",
         files={"train.csv": "label,text\n" + "".join(f"review {i},{i % 2}\n"
                                                      for i in range(80))}),
    Case("csv_class_only_in_test", [*CSV, "--test-file", "{tmp}/test.csv"],
         r"test\.csv column 'label' has label\(s\) that never occur in .*train\.csv: 2 \(row 3\)"
         r"; .* --num-labels", files={"train.csv": GOOD_CSV, "test.csv": _csv([0, 1, 0, 2])}),
    Case("csv_one_based", CSV, r"labels 1\.\.3 look 1-based: renumber them 0\.\.2, or use them "
         r"as names with --label-names 1,2,3", files={"train.csv": _csv([1, 2, 3] * 30)}),
    Case("csv_empty", CSV, r"train\.csv is empty: it needs a header line and at least one row",
         files={"train.csv": ""}, fix=CSV),
    Case("csv_header_only", CSV, r"train\.csv has a header line \['text', 'label'\] but no rows",
         files={"train.csv": "text,label\n"}),
    Case("csv_extra_field", CSV, r"train\.csv line 4: 3 fields, but the header has 2 .*quote a "
         r"text that contains a comma", files={"train.csv": GOOD_CSV.replace(
             "review number 2,0", "review number 2, the best,0")}),
    Case("csv_label_names_single", [*CSV, "--label-names", "neg"],
         r"label_names must be 2 or more distinct names, got \('neg',\)",
         files={"train.csv": GOOD_CSV}),
    # -- damaged artefacts of an earlier run
    Case("run_config_yaml_damaged", TINY, r"run/config\.yaml is damaged \(not valid YAML: .*\); "
         r"restore it, or delete .*run to start the run over",
         files={"run/config.yaml": "task: [unclosed\n"}),
    Case("run_config_yaml_unknown_field", TINY, r"run/config\.yaml is damaged \(unknown config "
         r"field\(s\): bogus", files={"run/config.yaml": "bogus: 1\n"}),
    Case("run_final_json_damaged", TINY, r"run/final\.json is damaged \(not valid JSON: .*\); "
         r"delete it and rerun the same command", files={"run/final.json": "{garbage"}),
    Case("report_final_json_damaged", ["report", "{tmp}"], r"run/final\.json is damaged \(not "
         r"valid JSON: .*\); rerun that run to rewrite it", files={"run/final.json": "[1,"}),
]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tokenisation cache for the module: the corrected commands share its entries."""
    return tmp_path_factory.mktemp("cache")


def _fill(args: list[str], tmp: Path) -> list[str]:
    return [a.format(tmp=tmp, out=tmp / "run") for a in args]


def _argv(args: list[str], tmp: Path) -> list[str]:
    """`train ... --out {tmp}/run` unless the case names its command or --out itself."""
    args = _fill(args, tmp)
    if args[0] in ("report", "sweep"):
        return args
    return ["train", *args] + ([] if "--out" in args else ["--out", str(tmp / "run")])


def cli(argv: list[str], capfd: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    from fedjax_lm.cli import main

    try:
        code = main(argv)
    except SystemExit as e:  # argparse's usage errors
        code = e.code
    out, err = capfd.readouterr()
    return code, out, err


def one_error_line(err: str, command: str) -> str:
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    prefix = f"fedjax-lm {command}: error: " if command else "fedjax-lm: error: "
    assert lines[0].startswith(prefix), lines[0]
    return lines[0][len(prefix):]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_exit_2_and_the_fix_works(
    case: Case, tmp_path: Path, cache_dir: Path, capfd: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if case.setup is _not_writable and os.geteuid() == 0:
        pytest.skip("root writes anywhere")
    monkeypatch.setenv("FEDJAX_LM_CACHE_DIR", str(cache_dir))
    for key, value in case.env.items():
        monkeypatch.setenv(key, value.format(tmp=tmp_path))
    for name, text in case.files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    if case.setup is not None:
        case.setup(tmp_path)
    argv = _argv(case.argv, tmp_path)
    code, _, err = cli(argv, capfd)
    assert code == 2, err
    command = "" if case.id == "unknown_flag" else argv[0]
    assert re.search(case.error, one_error_line(err, command)), err
    if case.fix is None:
        return
    # the corrected command (with the file or environment fixed) works in the same --out
    monkeypatch.setenv("FEDJAX_LM_CACHE_DIR", str(cache_dir))
    if case.files.get("train.csv") is not None:
        (tmp_path / "train.csv").write_text(GOOD_CSV)
    fixed = _argv(case.fix, tmp_path)
    assert fixed[fixed.index("--out") + 1] == argv[argv.index("--out") + 1]
    code, out, err = cli(fixed, capfd)
    assert code == 0, err
    assert "Traceback" not in err and "final accuracy" in out
    assert (tmp_path / "run" / "final.json").is_file()


def test_csv_label_mapping_is_printed_at_the_start_of_every_run(
    tmp_path: Path, cache_dir: Path, capfd: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FEDJAX_LM_CACHE_DIR", str(cache_dir))
    (tmp_path / "train.csv").write_text(_csv(["neg", "pos"] * 40))
    code, out, err = cli(_argv([*CSV, "--label-names", "pos,neg"], tmp_path), capfd)
    assert code == 0, err
    assert re.search(r"labels of .*train\.csv column 'label': 2 classes: 0='pos' \(40 rows\), "
                     r"1='neg' \(40 rows\)", out), out


def test_damaged_final_json_is_rebuilt_by_the_advised_rerun(
    tmp_path: Path, cache_dir: Path, capfd: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FEDJAX_LM_CACHE_DIR", str(cache_dir))
    argv = _argv(TINY, tmp_path)
    assert cli(argv, capfd)[0] == 0
    final = tmp_path / "run" / "final.json"
    good = json.loads(final.read_text())
    final.write_text(final.read_text()[:40])  # cut short
    code, _, err = cli(argv, capfd)
    assert code == 2 and "delete it and rerun the same command" in one_error_line(err, "train")
    final.unlink()
    assert cli(argv, capfd)[0] == 0
    assert json.loads(final.read_text())["params_sha256"] == good["params_sha256"]


def test_damaged_tokenisation_cache_is_named_removed_and_rebuilt(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Not an error: one warning line per damaged entry (stderr in a real run), then rebuilt."""
    monkeypatch.setenv("FEDJAX_LM_CACHE_DIR", str(tmp_path / "cache"))
    argv = _argv(TINY, tmp_path)
    assert cli(argv, capfd)[0] == 0
    entries = sorted((tmp_path / "cache" / "tokenized").glob("*.npz"))
    assert len(entries) == 2
    for entry in entries:
        entry.write_bytes(entry.read_bytes()[:100])
    shutil.rmtree(tmp_path / "run")
    with caplog.at_level("WARNING", logger="fedjax_lm.data.cache"):
        code, _, err = cli(argv, capfd)
    assert code == 0 and "Traceback" not in err
    warnings = sorted(r.getMessage() for r in caplog.records)
    assert len(warnings) == 2 and all(str(e) in w and "removed, rebuilding it" in w
                                      for e, w in zip(entries, warnings, strict=True))
    caplog.clear()
    assert cli(argv + ["--out", str(tmp_path / "again")], capfd)[0] == 0
    assert not caplog.records  # the rebuilt entries are used


def test_tokenizers_never_run_shipped_code(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers

    from fedjax_lm.data import load_tokenizer
    from fedjax_lm.models.pretrained import _tokenizer

    calls: list[dict] = []
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        lambda *args, **kwargs: calls.append(kwargs))
    (tmp_path / "vocab.txt").write_text("[PAD]\n")
    load_tokenizer(tmp_path)
    _tokenizer(tmp_path)
    assert len(calls) == 2 and all(kw.get("trust_remote_code") is False for kw in calls)


def _spawn(argv: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fedjax_lm.cli", *argv], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def test_ctrl_c_is_one_line_exit_130_and_the_rerun_resumes(tmp_path: Path, cache_dir: Path):
    """A real process, interrupted mid-training (the process group, as a terminal does); its
    stderr is also free of transformers' "PyTorch was not found" banner."""
    env = {**os.environ, "FEDJAX_LM_CACHE_DIR": str(cache_dir)}
    argv = _argv([*TINY[:-3], "--rounds", "400", "--no-progress"], tmp_path)
    proc = _spawn(argv, env)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and (
            not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.strip() == ("fedjax-lm train: interrupted; rerun the same command to resume "
                           "from the last checkpoint")
    done = len(metrics.read_text().splitlines())
    assert 3 <= done < 400
    proc = _spawn([*argv[:argv.index("--rounds")], "--rounds", str(done + 2),
                   *argv[argv.index("--rounds") + 2:]], env)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "PyTorch was not found" not in err and "Traceback" not in err
    rounds = [json.loads(line)["round"] for line in metrics.read_text().splitlines()]
    assert rounds == list(range(1, done + 3))


def test_failing_sweep_cell_is_one_line(tmp_path: Path, cache_dir: Path) -> None:
    (tmp_path / "train.csv").write_text(_csv([0, 1] * 40 + [7]))
    preset = tmp_path / "p.yaml"
    preset.write_text(f"name: p\nbase: {{task: csv, train_file: {tmp_path}/train.csv, model: "
                      "'preset:tiny', max_length: 16, batch_size: 8, local_epochs: 1, rounds: 1}\n"
                      "sweep: {clients: [1, 2]}\n")
    env = {**os.environ, "FEDJAX_LM_CACHE_DIR": str(cache_dir)}
    proc = _spawn(["sweep", "--config", str(preset), "--out-dir", str(tmp_path / "s"),
                   "--no-progress"], env)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert re.match(r"fedjax-lm sweep: cell clients=1: error: .*train\.csv column 'label' has "
                    r"integer labels with a gap \(5 values from 2 to 6 never occur\): 7", err)
