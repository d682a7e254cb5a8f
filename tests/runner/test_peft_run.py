"""PEFT runs through the runner: the base stays bitwise, bytes per client are counted, a
server optimizer over the adapters checkpoints and resumes."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from fedjax_lm.grid import ResumeError
from fedjax_lm.io import read_jsonl
from fedjax_lm.models import Model, preset
from fedjax_lm.runner import train
from fedjax_lm.runner.experiment import build_engine, build_experiment, round_data
from fedjax_lm.runner.peft import build_peft, model_overrides
from tests.runner.test_train import tiny

HIDDEN, LAYERS = 64, 2  # preset:tiny


def _leaves(params):
    return {jax.tree_util.keystr(k): np.asarray(v)
            for k, v in jax.tree_util.tree_leaves_with_path(params)}


@pytest.mark.slow
def test_lora_run_keeps_the_base_bitwise_and_trains_adapters_and_head(tmp_path):
    cfg = tiny(tmp_path, peft="lora", lora_rank=4, lora_targets=("query", "value"), rounds=2)
    exp = build_experiment(cfg)
    engine = build_engine(cfg, exp)
    state = engine.init(exp.params, jax.random.key(cfg.seed))
    ids = np.arange(exp.num_clients)
    for r in range(2):
        state = engine.run_round(state, round_data(cfg, exp, r, ids), client_ids=ids).state
    before, after = _leaves(exp.params), _leaves(state.params)
    moved = {k for k in before if not np.array_equal(before[k], after[k])}
    assert moved == {k for k in before if "lora_b" in k or "lora_a" in k or "'head'" in k}


CONFIGS = {"full": {}, "lora": dict(peft="lora", lora_rank=8),
           "ffa": dict(peft="lora", lora_rank=8, lora_aggregation="ffa"),
           "mixed": dict(peft="lora", lora_rank=8, lora_ranks=("2", "8"))}


def expected_bytes(params):
    total = sum(x.size * 4 for x in jax.tree.leaves(params))
    head = sum(x.size * 4 for x in jax.tree.leaves(params["head"]))
    per_rank = LAYERS * 2 * (HIDDEN + HIDDEN) * 4  # query and value: A column + B row
    per_rank_b = LAYERS * 2 * HIDDEN * 4
    return {"full": total, "lora": head + 8 * per_rank, "ffa": head + 8 * per_rank_b,
            # clients 0, 2 rank 2; client 1 rank 8 (tiers cycle over the 3 clients)
            "mixed": head + (2 + 8 + 2) / 3 * per_rank}


def test_bytes_per_client_full_vs_lora_ffa_and_mixed_ranks(tmp_path):
    for name, kw in CONFIGS.items():
        cfg = tiny(tmp_path, **kw)
        model = Model(preset("tiny", num_labels=2, vocab_size=1000, **model_overrides(cfg)))
        params = jax.eval_shape(model.init, jax.random.key(0))
        plan = build_peft(cfg, params, cfg.clients)
        assert plan.client_bytes(np.arange(3)) == expected_bytes(params)[name], name


@pytest.mark.slow
def test_bytes_per_client_in_metrics_and_final(tmp_path):
    runs = {}
    for name, kw in CONFIGS.items():
        cfg = tiny(tmp_path / name, rounds=1, **kw)
        final = train(cfg, progress=False)
        runs[name] = (read_jsonl(tmp_path / name / "run" / "metrics.jsonl")[0], final)
    exp = build_experiment(tiny(tmp_path))
    expected = expected_bytes(exp.params)
    total, head = expected["full"], sum(x.size * 4 for x in jax.tree.leaves(exp.params["head"]))
    for name, (record, final) in runs.items():
        assert record["upload_bytes_per_client"] == expected[name], name
        assert record["download_bytes_per_client"] == expected[name], name
        assert final["upload_bytes_per_client"] == expected[name], name
    assert runs["full"][1]["base_download_bytes"] == 0
    assert runs["lora"][1]["base_download_bytes"] == total - head  # A and B are extra leaves


@pytest.mark.slow
def test_adapters_with_a_server_optimizer_resume_bitwise(tmp_path):
    kw = dict(peft="bitfit", server_optimizer="fedadam", server_lr=0.01, rounds=2)
    whole = train(tiny(tmp_path / "a", **kw), progress=False)
    train(tiny(tmp_path / "b", **{**kw, "rounds": 1}), progress=False)
    resumed = train(tiny(tmp_path / "b", **kw), progress=False)
    assert resumed["params_sha256"] == whole["params_sha256"]


@pytest.mark.slow
def test_resume_onto_a_changed_base_is_refused(tmp_path):
    cfg = tiny(tmp_path, peft="lora", lora_rank=2, rounds=1)
    train(cfg, progress=False)
    base = json.loads((tmp_path / "run" / "base.json").read_text())
    assert base["model"] == "preset:tiny" and len(base["base_sha256"]) == 64
    (tmp_path / "run" / "base.json").write_text(json.dumps({**base, "base_sha256": "0" * 64}))
    with pytest.raises(ResumeError) as e:
        train(cfg.replace(rounds=2), progress=False)
    assert str(e.value) == (
        f"{tmp_path / 'run'} holds 1 round(s) of adapters trained on another base model "
        f"(base_sha256: 000000000000… -> {base['base_sha256'][:12]}…): the weights of "
        "--model preset:tiny changed since. Resume with the original base, or use another --out.")


@pytest.mark.slow
def test_export_merged_round_trips_through_our_loader(tmp_path):
    from fedjax_lm.cli import main
    from fedjax_lm.models import from_pretrained
    from fedjax_lm.runner.export import run_model
    from tests.models.test_encoder import make_batch

    cfg = tiny(tmp_path, peft="lora", lora_rank=4, lora_targets=("query", "output"), rounds=1,
               lr=0.5)
    train(cfg, progress=False)
    assert main(["export", cfg.out, "--merged", str(tmp_path / "hf")]) == 0
    rounds, model, params, _ = run_model(Path(cfg.out))
    assert rounds == 1 and np.abs(params["layers"][0]["ffn_out"]["lora_b"]).max() > 0
    loaded = from_pretrained(tmp_path / "hf", model.config.num_labels)
    assert len(loaded.tokenizer) == 30522  # preset:tiny uses MiniLM's tokenizer
    batch = make_batch()
    np.testing.assert_allclose(loaded.model.apply(loaded.params, batch, train=False).logits,
                               model.apply(params, batch, train=False).logits, atol=1e-5)


def test_export_of_a_mean_pooled_run_is_refused_in_one_line(tmp_path, capsys):
    """No transformers class pools by token mean: export says so before loading anything."""
    import yaml

    from fedjax_lm.cli import main

    cfg = tiny(tmp_path, peft="lora", pooling="mean")
    Path(cfg.out).mkdir(parents=True)
    (Path(cfg.out) / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    assert main(["export", cfg.out, "--merged", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"fedjax-lm export: error: cannot export {cfg.out}: pooling=mean has no "
                   "transformers class (*ForSequenceClassification reads [CLS], through the "
                   "pooler), so a merged export would classify differently; train with "
                   "--pooling cls to export")
    assert not (tmp_path / "hf").exists()


def test_export_never_writes_into_a_run_or_a_folder_of_other_files(tmp_path, capsys):
    """--merged must be new, empty or an earlier export: refused before the run is read."""
    from fedjax_lm.cli import main

    run = tmp_path / "other_run"
    run.mkdir()
    (run / "config.yaml").write_text("rounds: 1\n")
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "a.txt").write_text("keep")
    (tmp_path / "file").write_text("keep")
    for out, why in ((run, "is a run directory; export into a new folder"),
                     (notes, "holds other files (it is not an earlier export); export into a "
                             "new or empty folder"),
                     (tmp_path / "file", "is a file, not a folder; choose another --merged")):
        assert main(["export", str(tmp_path / "nosuch"), "--merged", str(out)]) == 2
        assert capsys.readouterr().err == f"fedjax-lm export: error: --merged {out} {why}\n"
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml"]
    assert (notes / "a.txt").read_text() == (tmp_path / "file").read_text() == "keep"
