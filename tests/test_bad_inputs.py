"""Bad inputs and faults a new user meets, table-driven. For each row `fedjax-lm` exits with
the row's code (2) and one stderr line naming the cause and the fix, never a traceback; then the
corrected command works in the same --out (exit 0, a final.json written). When the failure left
no --out behind and an earlier row already ran that same corrected command from a fresh --out,
the row does not repeat the identical run.

A row is `Case(id, argv, error, ...)`; adding one is one line or three:
  argv   the failing command; `train` and `--out {out}` are added unless it names its command
         (report, sweep) or its own --out. {tmp} is a fresh folder, {out} is {tmp}/run.
  error  regex searched in the one stderr line, after "fedjax-lm <command>: error: ".
  fix    the corrected command, run next in the same --out (a row about --out itself names its
         own --out in argv, and the fix runs in the --out the message advises, {out}). Default:
         argv minus its last flag (`--flag value`, `--flag=value` or `--flag`), i.e. the same
         command without the bad flag. A tuple of commands runs them in order.
  files  {name: text} written under {tmp} before argv; `fixed` is written over them before fix.
  env    set for argv only (the fix runs in the fixed environment).
  setup / repair  callables(tmp) run before argv / before fix (what the user does in between).
  trained  {out} starts as a copy of the session's trained 2-round run (TRAINED is its command).
  code   the exit code of argv: 2, or 0 for a fault the run recovers from (`error` then matches
         its one warning line, after "warning: ").
  then   callable(tmp, trained_final, stdout of the last fix): more assertions after the fix.

Everything runs in-process (`cli.main`), sharing compiled programs across rows
(`shared_compiles`); the Ctrl-C tests interrupt real processes, and a sweep runs its cells as
processes of their own.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import TINY_ARGV, TRAINED_ARGV

pytestmark = pytest.mark.usefixtures("shared_compiles")

TINY = TINY_ARGV  # one round on the tiny preset
TRAINED = TRAINED_ARGV  # TINY with --rounds 2: the command of the `trained` run
BERT = Path(__file__).resolve().parent / "fixtures" / "parity" / "bert"


def _csv(labels: list, header: str = "text,label") -> str:
    return header + "\n" + "".join(f"review number {i},{label}\n" for i, label in enumerate(labels))


GOOD_CSV = _csv([0, 1] * 40)


def _tiny_preset(sweep: str) -> str:
    """A preset of TINY cells with the given `sweep:` grid (YAML flow mapping)."""
    return ("base: {model: 'preset:tiny', task: synthetic, max_train_examples: 96, "
            "max_test_examples: 48, max_length: 16, batch_size: 8, local_epochs: 1, rounds: 1}\n"
            f"sweep: {sweep}\n")


VECTORIZE = ["sweep", "--config", "{tmp}/p.yaml", "--out-dir", "{tmp}/s", "--no-progress",
             "--vectorize"]


@dataclass(frozen=True)
class Case:
    """One row of the table (see the module docstring)."""

    id: str
    argv: list[str]
    error: str
    files: dict[str, str] = field(default_factory=dict)
    fix: list[str] | tuple[list[str], ...] | None = None
    fixed: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    setup: Callable[[Path], None] | None = None
    repair: Callable[[Path], None] | None = None
    trained: bool = False
    code: int = 2
    then: Callable[[Path, dict, str], None] | None = None

    def fixes(self) -> tuple[list[str], ...]:
        if self.fix is None:
            last = max(i for i, a in enumerate(self.argv) if a.startswith("--"))
            return (self.argv[:last],)
        return self.fix if isinstance(self.fix, tuple) else (self.fix,)


def _model_folder(config: dict | str) -> Callable[[Path], None]:
    """A copy of the BERT fixture whose config.json is updated with `config` (or is `config`)."""

    def make(tmp: Path) -> None:
        folder = tmp / "model"
        shutil.copytree(BERT, folder)
        text = config if isinstance(config, str) else json.dumps(
            json.loads((folder / "config.json").read_text()) | config)
        (folder / "config.json").write_text(text)

    return make


def _not_writable(tmp: Path) -> None:
    (tmp / "locked").mkdir()
    (tmp / "locked").chmod(0o500)


def _imdb_folder(tmp: Path) -> None:
    """A data directory holding a tiny imdb/imdb_50k.parquet (the real one's columns)."""
    import pandas as pd

    (tmp / "data" / "imdb").mkdir(parents=True)
    pd.DataFrame({"text": [f"review number {i}" for i in range(160)], "label": [0, 1] * 80,
                  "orig_split": ["train"] * 100 + ["test"] * 60}).to_parquet(
        tmp / "data" / "imdb" / "imdb_50k.parquet")


def _delete(*names: str) -> Callable[[Path], None]:
    def delete(tmp: Path) -> None:
        for name in names:
            path = tmp / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()

    return delete


def _damage_checkpoint(*names: str) -> Callable[[Path], None]:
    """Cut short the largest file (array data) of the trained run's newest checkpoint, or
    overwrite `names` in it with garbage; and remove final.json (as if killed at the end)."""

    def damage(tmp: Path) -> None:
        newest = tmp / "run" / "checkpoints" / "2"
        if names:
            for name in names:
                (newest / name).write_text("{garbage")
        else:
            path = max((p for p in newest.rglob("*") if p.is_file()),
                       key=lambda p: p.stat().st_size)
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
        (tmp / "run" / "final.json").unlink()

    return damage


def _same_model(tmp: Path, trained: dict, out: str) -> None:
    """The rerun ends with the parameters of the run that was never damaged."""
    final = json.loads((tmp / "run" / "final.json").read_text())
    assert final["params_sha256"] == trained["params_sha256"]
    rounds = [json.loads(line)["round"] for line in (tmp / "run" / "metrics.jsonl").open()]
    assert rounds == [1, 2]


def _untouched(*names: str) -> Callable[[Path, dict, str], None]:
    def check(tmp: Path, trained: dict, out: str) -> None:
        for name in names:
            assert (tmp / "run" / name).read_bytes() == (tmp / "orig" / name).read_bytes()

    return check


def _label_mapping_printed(tmp: Path, trained: dict, out: str) -> None:
    """Every csv run starts by saying how it read the labels."""
    assert re.search(r"^labels of .*train\.csv column 'label': 2 classes: 0='pos' \(40 rows\), "
                     r"1='neg' \(40 rows\)$", out, re.M), out


# TINY with the task replaced; CSV_MINILM: the same on the default model, MiniLM (one row
# trains the pretrained model end to end; the others check the data layer, model-agnostic)
CSV = [*TINY[:2], "--task", "csv", "--train-file", "{tmp}/train.csv", *TINY[4:]]
CSV_MINILM = ["--task", "csv", "--train-file", "{tmp}/train.csv", *TINY[4:]]
GOOD = {"train.csv": GOOD_CSV}

CASES = [
    # -- flags and config values that used to fail deep inside the run (or not at all)
    Case("cohort_larger_than_population", [*TINY, "--clients", "4", "--cohort-size", "5"],
         r"cohort_size must be in \[1, clients=4\], got 5: a cohort cannot be larger than "
         r"the population; lower --cohort-size or raise --clients",
         fix=[*TINY, "--clients", "4", "--cohort-size", "4"]),
    Case("holdout_without_eval_clients", [*TINY, "--holdout-clients", "2"],
         r"holdout_clients are evaluated by --eval-clients K .*: add --eval-clients"),
    Case("seed_negative", [*TINY, "--seed", "-1"], r"seed must be in \[0, 4294967294\], got -1",
         fix=[*TINY, "--seed", "0"]),
    Case("alpha_inf", [*TINY, "--partition", "dirichlet", "--alpha", "inf"],
         r"alpha must be a finite number, got 'inf'",
         fix=[*TINY, "--partition", "dirichlet", "--alpha", "0.5"]),
    Case("lr_inf", [*TINY, "--lr", "inf"], r"lr must be a finite number, got 'inf'"),
    Case("server_lr_nan", [*TINY, "--server-lr", "nan"],
         r"server_lr must be a finite number, got 'nan'"),
    Case("momentum_inf", [*TINY, "--momentum", "inf"],
         r"momentum must be a finite number, got 'inf'"),
    Case("hidden_act_unknown", [*TINY, "--hidden-act", "swishy"],
         r"unknown hidden_act 'swishy'; valid: gelu, .*abu"),
    Case("natural_without_authors", [*TINY, "--partition", "natural"],
         r"partition natural needs a task .*: blog10, blog50; task 'synthetic' has none: use "
         r"another partition"),
    Case("eval_batch_size_zero", [*TINY, "--eval-batch-size", "0"],
         r"eval_batch_size must be >= 1, got 0", fix=[*TINY, "--eval-batch-size", "16"]),
    Case("model_tiny", [*TINY, "--model", "tiny"],
         r"model 'tiny' is neither a folder nor a named model; .* use --model preset:tiny"),
    Case("model_preset_unknown", [*TINY, "--model", "preset:huge"],
         r"unknown model preset 'huge'; valid: preset:tiny, preset:mini"),
    Case("model_type_unknown", [*TINY, "--model-type", "roberta"],
         r"model_type must be one of bert, distilbert, albert, got 'roberta'"),
    Case("max_train_examples_zero", [*TINY, "--max-train-examples", "0"],
         r"max_train_examples must be >= 1 \(or unset\), got 0"),
    Case("clients_more_than_examples", [*TINY, "--clients", "1000"],
         r"fewer examples \(96\) than clients \(1000\); use fewer clients or more examples"),
    Case("clients_not_int", [*TINY, "--clients", "four"], r"clients must be int, got 'four'"),
    Case("num_labels_on_builtin_task", [*TINY, "--num-labels", "3"],
         r"num_labels / label_names pin the classes of task csv; .* unset them"),
    Case("set_bad_yaml", [*TINY, "--set", "lr=["], r"override 'lr=\[': '\[' is not a valid YAML "
         r"value \(quote it"),
    Case("set_and_flag_both", [*TINY, "--set", "rounds=abc"],
         r"^rounds is set twice \(--set rounds=\.\.\. and --rounds\): keep one$"),
    Case("preset_empty", [*TINY, "--config", "{tmp}/p.yaml"],
         r"p\.yaml holds no settings \(empty, or only comments\): write the settings into it, "
         r"or leave out --config to run the defaults$", files={"p.yaml": "# to do\n"},
         fixed={"p.yaml": "base: {rounds: 1}\n"}, fix=[*TINY, "--config", "{tmp}/p.yaml"]),
    Case("scaffold_freeze_layers", [*TINY, "--algorithm", "scaffold", "--freeze-layers", "1"],
         r"^freeze_layers runs with algorithm fedavg or fedprox, not scaffold \(its control "
         r"variates would train the frozen layers\); drop --freeze-layers$"),
    Case("lora_every_layer_frozen", [*TINY, "--peft", "lora", "--freeze-layers", "2"],
         r"^freeze_layers 2 freezes every layer that holds adapters: only the head would train; "
         r"lower --freeze-layers, or use --peft head$"),
    Case("test_split_below_classes", [*TINY, "--max-test-examples", "3"],
         r"^the test split holds 3 example\(s\), fewer than the 4 classes of task 'synthetic': "
         r"its accuracy cannot tell a trained model from an untrained one; raise "
         r"--max-test-examples \(e\.g\. 80\)$"),
    Case("unknown_flag", [*TINY, "--rouds", "3"],
         r"unrecognized arguments: --rouds 3 \(see fedjax-lm --help\)"),
    Case("preset_not_yaml", [*TINY, "--config", "{tmp}/bad.yaml"],
         r"bad\.yaml is not valid YAML: .*\(line \d+, column \d+\)",
         files={"bad.yaml": "base: [1,\n"}, fixed={"bad.yaml": "base: {rounds: 1}\n"},
         fix=[*TINY, "--config", "{tmp}/bad.yaml"]),
    # a model folder whose config.json is wrong (the fixture ships no tokenizer, so the fix
    # trained here is the command without that folder)
    Case("config_json_heads", [*TINY, "--model", "{tmp}/model"],
         r"model/config\.json: hidden_size 32 is not a multiple of num_attention_heads 5; fix "
         r"that config", setup=_model_folder({"num_attention_heads": 5})),
    Case("config_json_string_size", [*TINY, "--model", "{tmp}/model"],
         r"model/config\.json: hidden_size must be int, got '32'",
         setup=_model_folder({"hidden_size": "32"})),
    Case("config_json_not_json", [*TINY, "--model", "{tmp}/model"],
         r"model/config\.json is not valid JSON \(.*\); fix that file, or point --model at "
         r"another model", setup=_model_folder("{garbage")),
    # (MiniLM at --max-length 512 trains too long for this table: the fix is the tiny preset)
    Case("max_length_beyond_model", [*TINY, "--model", "minilm", "--max-length", "1000"],
         r"max_length 1000 exceeds model 'minilm''s 512 positions; use --max-length 512",
         fix=TINY),
    # -- training that goes non-finite in round 1: nothing was checkpointed, so --out is reused
    Case("server_step_overflow", [*TINY, "--server-optimizer", "fedavgm", "--server-lr", "1e30"],
         r"^round 1: the server update \(server_optimizer=fedavgm, server_lr=1e\+30\) made the "
         r"server step norm non-finite \(NaN/Inf\) from finite client updates; stopping\. No "
         r"round was checkpointed, so .*/run can be reused: rerun with a lower server_lr \(now "
         r"1e\+30\) or a lower lr \(now 2e-05\)\.$"),  # fix: the default server_lr, 1
    Case("client_updates_non_finite", [*TINY, "--lr", "1e30"],
         r"^round 1: client\(s\) \[0, 1, 2, 3\] produced a non-finite update \(NaN/Inf\); "
         r"stopping\. No round was checkpointed, so .*/run can be reused: rerun with a lower lr "
         r"\(now 1e\+30\)\.$"),  # fix: the default lr, 2e-5
    Case("every_client_skipped", [*TINY, "--nonfinite", "skip", "--lr", "1e30"],
         r"^round 1: every client of the round \(\[0, 1, 2, 3\]\) produced a non-finite update "
         r"\(NaN/Inf\), so nothing was trained and there is no loss to report; stopping\. No "
         r"round was checkpointed, so .*/run can be reused: rerun with a lower lr"),
    # -- robust aggregation and attacks (issue 17)
    Case("malicious_fraction_half", [*TINY, "--attack", "sign_flip", "--malicious-fraction",
                                     "0.5"],
         r"malicious_fraction must be in \[0, 0\.5\) \(malicious clients are a minority\), "
         r"got 0\.5",
         fix=[*TINY, "--attack", "sign_flip", "--malicious-fraction", "0.25"]),
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
    Case("parameter_nothing_reads", [*TINY, "--trim-fraction", "0.2"],
         r"^--trim-fraction is read by --aggregator trimmed_mean, not by --aggregator mean: "
         r"drop it or set what reads it$"),
    Case("lora_flag_without_peft_lora", [*TINY, "--peft", "head", "--lora-rank", "4"],
         r"^--lora-rank needs --peft lora \(got --peft head\); add --peft lora or drop it$"),
    Case("lora_rank_zero", [*TINY, "--peft", "lora", "--lora-rank", "0"],
         r"lora_rank must be >= 1, got 0"),
    Case("lora_rank_beyond_projection", [*TINY, "--peft", "lora", "--lora-rank", "65"],
         r"model 'preset:tiny': lora_rank 65 exceeds projection query's size 64x64; use a rank "
         r"<= 64"),
    Case("lora_flags_without_peft_lora", [*TINY, "--lora-rank", "4", "--lora-dropout", "0.1"],
         r"--lora-rank, --lora-dropout need --peft lora \(got --peft none\); add --peft lora or "
         r"drop them", fix=[*TINY, "--peft", "lora", "--lora-rank", "4", "--lora-dropout", "0.1"]),
    Case("lora_ranks_above_rank", [*TINY, "--peft", "lora", "--lora-rank", "4",
                                   "--lora-ranks", "2,8"],
         r"lora_ranks must lie in \[1, lora_rank=4\], got 2,8"),
    Case("lora_exact_with_server_optimizer", [*TINY, "--peft", "lora", "--lora-aggregation",
                                              "exact", "--server-optimizer", "fedadam"],
         r"lora_aggregation exact replaces the adapters by the refactored mean product: it needs "
         r"server_optimizer=fedavg, server_lr=1, aggregator=mean and no attack"),
    Case("peft_with_scaffold", [*TINY, "--peft", "bitfit", "--algorithm", "scaffold"],
         r"peft bitfit runs with algorithm fedavg or fedprox, not scaffold"),
    Case("lora_rank_tiers_not_summing_to_one", [*TINY, "--peft", "lora",
                                                "--lora-ranks", "2:0.5,4:0.4"],
         r"^lora_ranks 2:0.5,4:0.4: tier shares must be > 0 and sum to 1 \(they sum to 0.9\)$"),
    Case("lora_rank_uniform_bounds_reversed", [*TINY, "--peft", "lora", "--lora-ranks",
                                               "uniform:8,2"],
         r"^lora_ranks uniform:8,2: the lower bound 8 exceeds the upper 2$",
         fix=[*TINY, "--peft", "lora", "--lora-ranks", "uniform:2,8"]),
    Case("pooling_unknown", [*TINY, "--pooling", "max"],
         r"^pooling must be one of cls, mean, got 'max'$"),
    Case("freeze_layers_beyond_model", [*TINY, "--freeze-layers", "3"],
         r"freeze_layers 3 exceeds the model's 2 stored layers; use at most 2"),
    # -- the file system
    Case("out_is_a_file", [*TINY, "--out", "{tmp}/file"],
         r"--out .*/file is a file, not a folder; choose another --out", files={"file": "x"},
         fix=TINY),
    Case("out_under_a_file", [*TINY, "--out", "{tmp}/file/run"],
         r"--out .*/file/run lies under a file \(.*/file\); choose another --out",
         files={"file": "x"}, fix=TINY),
    Case("out_not_writable", [*TINY, "--out", "{tmp}/locked/run"],
         r"cannot be written \(.*/locked is not writable\); choose another --out",
         setup=_not_writable, fix=TINY),
    Case("cache_dir_is_a_file", TINY, r"cache directory .*/file is unusable \(File exists\); "
         r"point \$FEDJAX_LM_CACHE_DIR at a writable folder", files={"file": "x"},
         env={"FEDJAX_LM_CACHE_DIR": "{tmp}/file"}, fix=TINY),
    Case("data_dir_missing", [*TINY, "--task", "imdb", "--data-dir", "{tmp}/nowhere"],
         r"data directory .*/nowhere does not exist", repair=_imdb_folder,
         fix=[*TINY, "--task", "imdb", "--data-dir", "{tmp}/data"]),
    Case("train_file_missing", [*CSV, "--train-file", "{tmp}/nope.csv"], r"missing file: .*nope",
         fixed=GOOD),
    # -- the user's own files (--task csv)
    Case("csv_typo_label", CSV, r"train\.csv column 'label' has integer labels with a gap "
         r"\(999998 values from 2 to 999999 never occur\): 1000000 \(row 80\); .*--num-labels K",
         files={"train.csv": _csv([0, 1] * 40 + [1000000])}, fixed=GOOD, fix=CSV),
    Case("csv_single_class", CSV, r"has a single class \(1 in all 80 rows\); a classifier needs "
         r"at least 2", files={"train.csv": _csv([1] * 80)}, fixed=GOOD, fix=CSV),
    Case("csv_stray_name", CSV, r"a mix of numbers and names \(mostly numbers\): 'pos' \(row 80\)"
         r"; make every label a number", files={"train.csv": _csv([0, 1] * 40 + ["pos"])},
         fixed=GOOD, fix=CSV),
    Case("csv_swapped_columns", CSV, r"column 'label' looks like texts or ids, not labels: 80 "
         r"distinct values in 80 rows .*check --label-column / --text-column",
         files={"train.csv": "label,text\n" + "".join(f"review {i},{i % 2}\n"
                                                      for i in range(80))},
         fix=[*CSV, "--text-column", "label", "--label-column", "text"]),
    Case("csv_class_only_in_test", [*CSV, "--test-file", "{tmp}/test.csv"],
         r"test\.csv column 'label' has label\(s\) that never occur in .*train\.csv: 2 \(row 3\)"
         r"; .* --num-labels", files={"train.csv": GOOD_CSV, "test.csv": _csv([0, 1, 0, 2])},
         fix=[*CSV, "--test-file", "{tmp}/test.csv", "--num-labels", "3"]),
    Case("csv_one_based", CSV, r"labels 1\.\.3 look 1-based: renumber them 0\.\.2, or use them "
         r"as names with --label-names 1,2,3", files={"train.csv": _csv([1, 2, 3] * 30)},
         fix=[*CSV, "--label-names", "1,2,3"]),
    Case("csv_unknown_label_name", [*CSV_MINILM, "--label-names", "pos,negg"],
         r"train\.csv column 'label' has label\(s\) that are neither one of --label-names "
         r"\['pos', 'negg'\] nor an index 0\.\.1: 'neg' \(rows 0, 2, 4 \+37 more\); fix those "
         r"rows or --label-names", files={"train.csv": _csv(["neg", "pos"] * 40)},
         fix=[*CSV_MINILM, "--label-names", "pos,neg"], then=_label_mapping_printed),
    Case("csv_empty", CSV, r"train\.csv is empty: it needs a header line and at least one row",
         files={"train.csv": ""}, fixed=GOOD, fix=CSV),
    Case("csv_header_only", CSV, r"train\.csv has a header line \['text', 'label'\] but no rows",
         files={"train.csv": "text,label\n"}, fixed=GOOD, fix=CSV),
    Case("csv_extra_field", CSV, r"train\.csv line 4: 3 fields, but the header has 2 .*quote a "
         r"text that contains a comma", files={"train.csv": GOOD_CSV.replace(
             "review number 2,0", "review number 2, the best,0")}, fixed=GOOD, fix=CSV),
    Case("csv_label_names_single", [*CSV, "--label-names", "neg"],
         r"label_names must be 2 or more distinct names, got \('neg',\)", files=GOOD),
    # -- differential privacy
    Case("dp_clip_zero", [*TINY, "--dp-clip", "0"],
         r"dp_clip must be > 0 \(the L2 bound on each client's update\), got 0"),
    Case("dp_clip_negative", [*TINY, "--dp-clip", "-1", "--dp-noise-multiplier", "1"],
         r"dp_clip must be > 0 .*, got -1",
         fix=[*TINY, "--dp-clip", "1", "--dp-noise-multiplier", "1"]),
    Case("dp_noise_without_clip", [*TINY, "--dp-noise-multiplier", "1"],
         r"dp_noise_multiplier needs dp_clip \(the L2 bound .*\): add --dp-clip C",
         fix=[*TINY, "--dp-noise-multiplier", "1", "--dp-clip", "1"]),
    Case("dp_target_epsilon_unreachable",
         [*TINY, "--dp-clip", "1", "--dp-delta", "1e-6", "--rounds", "1000",
          "--target-epsilon", "1"],
         r"target_epsilon 1 is out of reach in 1000 rounds: even dp_noise_multiplier 100 gives "
         r"epsilon 1\.47; train fewer rounds, sample fewer clients per round or raise the "
         r"target", fix=[*TINY, "--dp-clip", "1", "--dp-delta", "1e-6", "--target-epsilon", "8"]),
    Case("dp_delta_too_large", [*TINY, "--dp-clip", "1", "--dp-delta", "0.3"],
         r"dp_delta must be in \(0, 1/clients = 0\.25\): a delta of 1/N or more allows "
         r"publishing one client's data outright; got 0\.3"),
    Case("dp_with_median", [*TINY, "--dp-clip", "1", "--aggregator", "median"],
         r"DP-FedAvg adds its noise to a clipped sum .*; aggregator 'median' is not "
         r"that sum: use aggregator=mean with DP"),
    Case("dp_with_message_attack", [*TINY, "--dp-clip", "1", "--attack", "sign_flip",
                                    "--malicious-fraction", "0.25"],
         r"attack sign_flip rewrites the messages the aggregator sees, and DP-FedAvg replaces "
         r"the aggregator by its clipped sum: use --attack label_flip \(poisoned data\) with DP, "
         r"or drop --dp-clip",
         fix=[*TINY, "--dp-clip", "1", "--attack", "label_flip", "--malicious-fraction", "0.25"]),
    Case("dp_with_exact_lora", [*TINY, "--dp-clip", "1", "--peft", "lora",
                                "--lora-aggregation", "exact"],
         r"lora_aggregation exact refactors the mean adapter product, which DP-FedAvg's noised "
         r"sum of deltas is not: use --lora-aggregation fedit or ffa with DP",
         fix=[*TINY, "--dp-clip", "1", "--peft", "lora", "--lora-aggregation", "ffa"]),
    # -- run directories: what a rerun refuses, and damaged artefacts of an earlier run
    Case("fewer_rounds", TINY, r"run holds a run trained for 2 rounds: --rounds 1 cannot undo "
         r"rounds \(its parameters are the round-2 model\)\. Rerun with --rounds 2 or more, or "
         r"use another --out\.$", trained=True, fix=TRAINED,
         then=_untouched("final.json", "config.yaml", "metrics.jsonl")),
    Case("changed_config", [*TRAINED, "--lr", "0.5"], r"run holds a run from a different config "
         r"\(lr: 2e-05 -> 0\.5\)\. Use another --out, or delete .*run to start over",
         trained=True, then=_untouched("final.json", "config.yaml")),
    Case("run_config_yaml_damaged", TRAINED, r"run/config\.yaml is damaged \(not valid YAML: "
         r".*\); restore it, or delete .*run to start the run over", trained=True,
         files={"run/config.yaml": "task: [unclosed\n"}, repair=_delete("run"), fix=TINY),
    Case("run_config_yaml_unknown_field", TRAINED, r"run/config\.yaml is damaged \(unknown "
         r"config field\(s\): bogus", trained=True, files={"run/config.yaml": "bogus: 1\n"},
         repair=_delete("run"), fix=TINY),
    Case("run_final_json_damaged", TRAINED, r"run/final\.json is damaged \(not valid JSON: .*\); "
         r"delete it and rerun the same command", trained=True,
         files={"run/final.json": '{"rounds": 2, "conf'}, repair=_delete("run/final.json"),
         fix=TRAINED, then=_same_model),
    Case("report_final_json_damaged", ["report", "{tmp}"], r"run/final\.json is damaged \(not "
         r"valid JSON: .*\); delete it and rerun that run's command: it resumes and writes it "
         r"again; or move .*run out of ", trained=True, files={"run/final.json": "[1,"},
         repair=_delete("run/final.json"), fix=(TRAINED, ["report", "{tmp}"])),
    Case("checkpoint_truncated", TRAINED, r"checkpoint .*/run/checkpoints/2 is damaged \(\w+ "
         r"reading server\.params\.[\w.]+\); deleted it, resuming from an earlier one",
         trained=True, code=0,
         setup=_damage_checkpoint(), fix=TRAINED, then=_same_model),
    Case("checkpoint_metadata_garbage", TRAINED, r"checkpoint .*/run/checkpoints/2 is damaged "
         r"\(JSONDecodeError\); deleted it, resuming from an earlier one", trained=True, code=0,
         setup=_damage_checkpoint("default/_METADATA"), fix=TRAINED, then=_same_model),
    Case("checkpoint_manifest_garbage", TRAINED, r"checkpoint .*/run/checkpoints/2 is damaged "
         r"\(ValueError in default/manifest\.ocdbt\); deleted it, resuming from an earlier one",
         trained=True, code=0, setup=_damage_checkpoint("default/manifest.ocdbt"), fix=TRAINED,
         then=_same_model),
    # sweep --vectorize: not errors; what cannot share a program runs alone, said in one line
    Case("vectorize_shapes_differ_beyond_padding", VECTORIZE, r"^vectorize: max_length=16, "
         r"max_length=24 run\(s\) alone, each its own program: they differ in max_length, "
         r"beyond seed, lr", files={"p.yaml": _tiny_preset("{max_length: [16, 24]}")}, code=0),
    Case("vectorize_memory_too_large", [*VECTORIZE, "--vectorize-memory", "1KiB"],
         r"^vectorize: the program of 2 cells \(seed=0, seed=1\) needs [\d.]+ \w+, over the "
         r"1\.00 KiB budget \(vectorize memory\); the largest group that fits is 0 cell\(s\) "
         r"\(~[\d.]+ \w+ each\): running its cells one by one",
         files={"p.yaml": _tiny_preset("{seed: [0, 1]}")}, code=0),
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


def one_line(err: str, prefix: str) -> str:
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(prefix), lines[0]
    return lines[0][len(prefix):]


def one_error_line(err: str, command: str) -> str:
    return one_line(err, f"fedjax-lm {command}: error: " if command else "fedjax-lm: error: ")


def _write(tmp: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp / name).write_text(text)


# Corrected commands already run to success from a fresh --out in this session. A row whose
# failing command left no --out behind, and whose fix is one of these (the same argv, naming no
# file of the row's own, nothing repaired in between), would repeat that very run: the row
# asserts instead that nothing was started (no --out), which is what makes the --out reusable.
_FIXES_THAT_WORKED: set[tuple[tuple[str, ...], ...]] = set()


def _repeats_a_worked_fix(case: Case, tmp: Path) -> tuple[bool, tuple[tuple[str, ...], ...]]:
    key = tuple(tuple(fix) for fix in case.fixes())
    plain = (not case.fixed and case.repair is None and case.then is None and not case.trained
             and set(case.env) <= {"FEDJAX_LM_CACHE_DIR"}  # env: for the failing command only
             and not any("{" in arg for fix in key for arg in fix))
    return plain and not (tmp / "run").exists(), key


# Rows whose corrected command is a feature's own end-to-end run (a program no other default
# test compiles: LoRA, DP, attacks, robust aggregators, another head or model). By default such
# a row checks its error line; its corrected command runs with the slow tests
# (`test_costly_corrected_commands_work`), since each costs a compile of ~10-40 s on this CPU
# and the feature's training is covered by its own unit tests.
COSTLY_FIXES = {
    "csv_unknown_label_name", "csv_class_only_in_test", "data_dir_missing",
    "dp_clip_negative", "dp_target_epsilon_unreachable", "dp_delta_too_large",
    "dp_with_message_attack", "dp_with_exact_lora", "alie_in_chunks", "malicious_fraction_half",
    "trim_fraction_half", "median_in_chunks", "krum_too_few_clients", "lora_target_unknown",
    "lora_target_empty_name", "lora_flags_without_peft_lora", "lora_flag_without_peft_lora",
    "lora_ranks_above_rank", "lora_exact_with_server_optimizer",
    "lora_rank_uniform_bounds_reversed", "lora_rank_zero", "peft_with_scaffold",
    "lora_rank_beyond_projection", "lora_rank_tiers_not_summing_to_one",
    "dp_noise_without_clip", "dp_with_median", "csv_one_based",
}
# Rows whose failing command is itself a whole run (a warning, exit 0) that a unit test covers.
SLOW_ROWS = {"vectorize_shapes_differ_beyond_padding"}  # tests/runner/test_vectorized.py
assert {c.id for c in CASES} >= COSTLY_FIXES | SLOW_ROWS


@pytest.fixture
def row(tmp_path: Path, cache_dir: Path, capfd: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest):
    """`row(case, fix=True)`: the failing command's one line, then (with `fix`) the corrected
    command in the same --out."""

    def check(case: Case, fix: bool = True) -> None:
        if case.setup is _not_writable and os.geteuid() == 0:
            pytest.skip("root writes anywhere")
        monkeypatch.setenv("FEDJAX_LM_CACHE_DIR", str(cache_dir))
        trained = {}
        if case.trained:
            trained = request.getfixturevalue("copy_trained_run")(tmp_path / "run")
            shutil.copytree(tmp_path / "run", tmp_path / "orig")
        for key, value in case.env.items():
            monkeypatch.setenv(key, value.format(tmp=tmp_path))
        _write(tmp_path, case.files)
        if case.setup is not None:
            case.setup(tmp_path)
        argv = _argv(case.argv, tmp_path)
        code, _, err = cli(argv, capfd)
        assert code == case.code, err
        if case.code == 0:
            assert re.search(case.error, one_line(err, "warning: ")), err
        else:
            command = "" if case.id == "unknown_flag" else argv[0]
            assert re.search(case.error, one_error_line(err, command)), err
        if fix:
            monkeypatch.setenv("FEDJAX_LM_CACHE_DIR", str(cache_dir))
            _corrected_command_works(case, argv, tmp_path, trained, capfd)

    return check


def _corrected_command_works(case: Case, argv: list[str], tmp_path: Path, trained: dict,
                             capfd: pytest.CaptureFixture[str]) -> None:
    """The user follows the message: fixes the file, the environment or the command."""
    fresh, key = _repeats_a_worked_fix(case, tmp_path)
    if fresh and key in _FIXES_THAT_WORKED:
        return  # that exact command already worked from a fresh --out, as this one would
    _write(tmp_path, case.fixed)
    if case.repair is not None:
        case.repair(tmp_path)
    for fix in case.fixes():
        fixed = _argv(fix, tmp_path)
        if "--out" in fixed and "--out" in argv and "--out" not in case.argv:
            assert fixed[fixed.index("--out") + 1] == argv[argv.index("--out") + 1]
        code, out, err = cli(fixed, capfd)
        assert code == 0, err
        assert "Traceback" not in err and "error:" not in err, err
    if fixed[0] == "train":
        assert "final accuracy" in out and (tmp_path / "run" / "final.json").is_file()
    if case.then is not None:
        case.then(tmp_path, trained, out)
    if fresh:
        _FIXES_THAT_WORKED.add(key)


@pytest.mark.parametrize("case", [
    pytest.param(c, id=c.id, marks=[pytest.mark.slow] if c.id in SLOW_ROWS else []) for c in CASES])
def test_bad_input_is_one_line_and_the_corrected_command_works(case: Case, row) -> None:
    row(case, fix=case.id not in COSTLY_FIXES)


COSTLY = [c for c in CASES if c.id in COSTLY_FIXES]


@pytest.mark.slow
@pytest.mark.parametrize("case", COSTLY, ids=[c.id for c in COSTLY])
def test_costly_corrected_commands_work(case: Case, row) -> None:
    row(case)


@pytest.mark.parametrize("fault", ["damaged", "other_tokenizer"])
def test_damaged_or_foreign_population_store_is_named_and_rebuilt(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture, fault: str,
) -> None:
    """Not an error: one warning line per damaged store, or per store whose fingerprint names
    another tokenizer (stderr in a real run), then rebuilt and used."""
    monkeypatch.setenv("FEDJAX_LM_CACHE_DIR", str(tmp_path / "cache"))
    argv = _argv(TINY, tmp_path)
    assert cli(argv, capfd)[0] == 0
    stores = sorted(p for p in (tmp_path / "cache" / "tokenized").iterdir()
                    if not p.name.startswith("."))
    assert len(stores) == 2
    for store in stores:
        if fault == "damaged":
            ids = store / "input_ids.npy"
            ids.write_bytes(ids.read_bytes()[:100])
        else:
            meta = json.loads((store / "store.json").read_text())
            meta["fingerprint"]["tokenizer"] = "0123456789abcdef0123"
            (store / "store.json").write_text(json.dumps(meta))
    shutil.rmtree(tmp_path / "run")
    with caplog.at_level("WARNING", logger="fedjax_lm.data.tokenization"):
        code, _, err = cli(argv, capfd)
    assert code == 0 and "Traceback" not in err
    warnings = sorted(r.getMessage() for r in caplog.records)
    why = "is damaged" if fault == "damaged" else "built for another tokenizer '0123456789ab"
    assert len(warnings) == 2 and all(
        w.startswith(f"population store {e}: ") and why in w and w.endswith("rebuilding it")
        for e, w in zip(stores, warnings, strict=True)), warnings
    caplog.clear()
    assert cli(argv + ["--out", str(tmp_path / "again")], capfd)[0] == 0
    assert not caplog.records  # the rebuilt stores are used


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


def _spawn(argv: list[str], env: dict[str, str], *, wrap: str = "") -> subprocess.Popen:
    """`fedjax-lm ARGV` as a real process in its own process group; `wrap` is code run before
    the CLI (a test's hook)."""
    code = f"import sys\n{wrap}\nfrom fedjax_lm.cli import main\nsys.exit(main())"
    return subprocess.Popen([sys.executable, "-c", code, *argv], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


INTERRUPTED = ("fedjax-lm train: interrupted; rerun the same command to resume from the last "
               "checkpoint")


def test_ctrl_c_is_one_line_exit_130_and_the_rerun_resumes(
    tmp_path: Path, cache_dir: Path, capfd: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A real process, interrupted mid-training (the process group, as a terminal does); its
    stderr is that one line, so also free of transformers' "PyTorch was not found" banner."""
    monkeypatch.setenv("FEDJAX_LM_CACHE_DIR", str(cache_dir))
    argv = _argv([*TINY[:-3], "--rounds", "400", "--no-progress"], tmp_path)
    proc = _spawn(argv, dict(os.environ))
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and (
            not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.strip() == INTERRUPTED
    done = len(metrics.read_text().splitlines())
    assert 3 <= done < 400
    argv[argv.index("--rounds") + 1] = str(done + 2)
    code, out, err = cli(argv, capfd)
    assert code == 0 and "Traceback" not in err, err
    rounds = [json.loads(line)["round"] for line in metrics.read_text().splitlines()]
    assert rounds == list(range(1, done + 3))


def test_sigterm_stops_a_background_sweep_and_its_cell_cleanly(
    tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A sweep started in the background (SIGINT ignored) and stopped by `kill` / a scheduler
    (SIGTERM to the sweep process alone): it passes the signal to its running cell, which stops
    at a safe point; one line, exit 130, and the cell's checkpoint resumes."""
    from fedjax_lm.runner.rundir import checkpointed_round

    monkeypatch.setenv("FEDJAX_LM_CACHE_DIR", str(cache_dir))
    (tmp_path / "train.csv").write_text(GOOD_CSV)
    preset = tmp_path / "p.yaml"
    preset.write_text(f"name: p\nbase: {{task: csv, train_file: {tmp_path}/train.csv, model: "
                      "'preset:tiny', max_length: 16, batch_size: 8, local_epochs: 1, "
                      "rounds: 400, checkpoint_every: 1}\nsweep: {clients: [2]}\n")
    argv = ["sweep", "--config", str(preset), "--out-dir", str(tmp_path / "s"), "--no-progress"]
    proc = _spawn(argv, dict(os.environ),
                  wrap="import signal; signal.signal(signal.SIGINT, signal.SIG_IGN)")
    metrics = tmp_path / "s" / "clients=2" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and (
            not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)  # the sweep process only, not its group
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.strip() == ("fedjax-lm sweep: cell clients=2: interrupted; rerun the same "
                           "command to resume from the last checkpoint"), err
    done = len(metrics.read_text().splitlines())
    assert 3 <= done < 400
    assert checkpointed_round(tmp_path / "s" / "clients=2") in (done - 1, done)


# Round 1's checkpoint write is slow to start: 4 s inside Checkpointer.save before orbax writes
# (an interrupt raised there would leave no round-1 checkpoint).
SLOW_SAVE = textwrap.dedent("""
    import pathlib, time
    import orbax.checkpoint as ocp
    save = ocp.CheckpointManager.save
    def slow_save(self, step, *args, **kwargs):
        if step == 1:
            pathlib.Path(sys.argv[-1] + ".saving").write_text("1")
            time.sleep(4)
        return save(self, step, *args, **kwargs)
    ocp.CheckpointManager.save = slow_save
""")


def test_ctrl_c_during_a_checkpoint_write_waits_for_it(
    tmp_path: Path, cache_dir: Path, trained_run: Path, capfd: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Ctrl-C while round 1's checkpoint is being written: the write completes, then the run
    stops (one line, exit 130) with that checkpoint whole, and the rerun resumes from it to the
    very model of a run never interrupted."""
    from fedjax_lm.runner.rundir import checkpointed_round

    monkeypatch.setenv("FEDJAX_LM_CACHE_DIR", str(cache_dir))
    argv = _argv(TRAINED, tmp_path)
    proc = _spawn(argv, dict(os.environ), wrap=SLOW_SAVE)
    saving = tmp_path / "run.saving"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not saving.exists():
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.strip() == INTERRUPTED
    assert checkpointed_round(tmp_path / "run") == 1
    assert not (tmp_path / "run" / "final.json").exists()
    code, _, err = cli(argv, capfd)
    assert code == 0 and "warning" not in err, err  # round 1's checkpoint restores whole
    final = json.loads((tmp_path / "run" / "final.json").read_text())
    assert final["params_sha256"] == json.loads(
        (trained_run / "final.json").read_text())["params_sha256"]


def test_failing_sweep_cell_is_one_line(tmp_path: Path, cache_dir: Path,
                                        capfd: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The cells run as processes of their own; the failing one's line names the cell."""
    monkeypatch.setenv("FEDJAX_LM_CACHE_DIR", str(cache_dir))
    (tmp_path / "train.csv").write_text(_csv([0, 1] * 40 + [7]))
    preset = tmp_path / "p.yaml"
    preset.write_text(f"name: p\nbase: {{task: csv, train_file: {tmp_path}/train.csv, model: "
                      "'preset:tiny', max_length: 16, batch_size: 8, local_epochs: 1, rounds: 1}\n"
                      "sweep: {clients: [1, 2]}\n")
    code, _, err = cli(["sweep", "--config", str(preset), "--out-dir", str(tmp_path / "s"),
                        "--no-progress"], capfd)
    assert code == 2
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert re.match(r"fedjax-lm sweep: cell clients=1: error: .*train\.csv column 'label' has "
                    r"integer labels with a gap \(5 values from 2 to 6 never occur\): 7", err)
