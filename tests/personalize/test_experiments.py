"""Experiment plumbing: configs, the CLI hook, the ABU model/optimiser pieces, and smoke runs
of every experiment config (slow: XLA compiles several CNNs/encoders; a cheap moe cell on a
linear model runs by default)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lm.personalize import abu, moe
from fedjax_lm.personalize.cli import add_parsers
from fedjax_lm.personalize.config import load_config

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ["moe_cifar10", "moe_cifar10_optout", "moe_text", "abu_cifar10", "abu_cifar10_long",
           "abu_federated"]
DATA = Path(os.environ.get("FEDJAX_LM_DATA_DIR", ROOT.parent / "shared" / "data"))


@pytest.mark.parametrize("name", CONFIGS)
def test_configs_load_and_start_with_their_command(name):
    path = ROOT / "experiments" / f"{name}.yaml"
    first = path.read_text().splitlines()[0]
    assert first.startswith("#")
    assert f"experiments/{name}.yaml" in path.read_text().split("\nname:")[0]
    cls = moe.MoeConfig if name.startswith("moe") else (
        abu.AbuCifarConfig if name.startswith("abu_cifar10") else abu.AbuFederatedConfig)
    for smoke in (False, True):
        cfg = load_config(cls, path, smoke=smoke)
        assert cfg.name.startswith(name)


def test_unknown_config_key_is_an_error(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("name: x\nfedavg: {rounds: 2, roundz: 3}\n")
    with pytest.raises(ValueError, match="roundz"):
        load_config(moe.MoeConfig, p)


def test_bad_configs_are_one_line_cli_errors(tmp_path, capsys):
    from fedjax_lm.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nrun:\n  a: 1\n b: 2\n")
    assert main(["abu", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedjax-lm abu: error: ") and "is not valid YAML" in err
    assert "Traceback" not in err
    bad.write_text("name: x\nevil_clients: 3\n")
    assert main(["moe", "--config", str(bad)]) == 2
    assert "unknown key(s) ['evil_clients']" in capsys.readouterr().err
    cifar = str(ROOT / "experiments" / "abu_cifar10.yaml")
    assert main(["abu", "--config", cifar, "--work-dir", str(tmp_path)]) == 2
    assert "--work-dir applies to federated ABU configs only" in capsys.readouterr().err


def test_cli_subcommands():
    parser = argparse.ArgumentParser()
    add_parsers(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["moe", "--config", "c.yaml", "--smoke", "--out", "o"])
    assert args.command == "moe" and args.smoke and args.out == "o" and callable(args.func)
    args = parser.parse_args(["abu", "--config", "c.yaml", "--data-dir", "d"])
    assert args.data_dir == "d" and not args.smoke


def test_smcn_model_is_the_papers_smcn_at_width_64_and_narrows():
    from fedjax_lm.models.cnn import make_cnn_model

    shapes = lambda t: jax.tree.map(lambda x: tuple(x.shape), t)
    ours = jax.eval_shape(abu.smcn_model("abu_n", 64, 0.5).init, jax.random.key(0))
    ref = jax.eval_shape(make_cnn_model("smcn", 10, "abu_n").init, jax.random.key(0))
    assert shapes(ours) == shapes(ref)
    narrow = jax.eval_shape(abu.smcn_model("relu", 8, 0.5).init, jax.random.key(0))
    assert narrow["conv1"]["kernel"].shape == (5, 5, 3, 8)
    assert narrow["fc1"]["kernel"].shape == (8 * 8 * 8, 48)


def test_weight_decay_never_touches_blend_weights():
    params = {"act1": {"abu_n_w": jnp.full((5,), 0.2), "beta": jnp.ones(())},
              "act2": {"alpha": jnp.ones(())}, "fc": {"kernel": jnp.ones((2, 2))}}
    opt = abu.make_optimizer(1e-3, weight_decay=0.5)
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = opt.update(zero, opt.init(params), params)
    assert float(jnp.abs(updates["act1"]["abu_n_w"]).max()) == 0.0
    assert float(jnp.abs(updates["act1"]["beta"])) == 0.0
    assert float(jnp.abs(updates["act2"]["alpha"])) == 0.0
    assert float(jnp.abs(updates["fc"]["kernel"]).max()) > 0.0


def test_per_image_standardisation():
    rs = np.random.RandomState(0)
    imgs = rs.randint(0, 256, (3, 32, 32, 3)).astype(np.uint8)
    imgs[2] = 7  # a flat image: std floored, no division by zero
    x = abu.standardize(imgs)
    np.testing.assert_allclose(x[:2].mean(axis=(1, 2, 3)), 0, atol=1e-5)
    np.testing.assert_allclose(x[:2].std(axis=(1, 2, 3)), 1, atol=1e-4)
    assert np.all(np.isfinite(x[2])) and np.all(x[2] == 0)


def test_moe_cell_on_a_linear_model_runs_all_four_methods():
    """A cheap end-to-end cell: synthetic pool, majority skew, opt-out, the four methods."""
    from fedjax_lm.personalize.mixture import Classifier

    rs = np.random.RandomState(0)
    n, dim, k = 2000, 8, 4
    x = rs.randn(n, dim).astype(np.float32)
    feats = {"x": x, "label": x[:, :k].argmax(-1).astype(np.int32)}
    gx = rs.randn(40, dim).astype(np.float32)
    pool = moe.Pool(feats, {"x": gx, "label": gx[:, :k].argmax(-1).astype(np.int32)}, k, "synth")

    def lin(m):
        return Classifier(lambda key: {"w": 0.1 * jax.random.normal(key, (dim, m))},
                          lambda p, b, t, r: b["x"] @ p["w"])

    spec = moe.ModelSpec(lin(k), lin(1), lin(k).init, lin(k).init, lin(1).init)
    cfg = moe.MoeConfig(
        num_clients=8, train_size=20, val_size=10, test_size=10, k=2, eval_clients=3,
        opt_out_fraction=0.25, eval_batch_size=10,
        fedavg=moe.FedAvgConfig(rounds=2, cohort_size=2, local_epochs=1, lr=0.05, eval_every=1),
        local=moe.FitConfig(lr=0.05, max_epochs=2), finetune=moe.FitConfig(lr=0.05, max_epochs=2),
        mixture=moe.FitConfig(lr=0.05, max_epochs=2))
    cell = moe.run_cell(cfg, pool, moe.build_methods(cfg, spec), 0.8, 0, log=lambda m: None)
    assert set(cell["methods"]) == set(moe.METHODS)
    for rec in cell["methods"].values():
        assert len(rec["local_acc"]) == 3 and all(0 <= a <= 1 for a in rec["global_acc"])
    assert 0 < np.mean(cell["methods"]["mixture"]["gate_local"]) < 1
    rows = moe.report.moe_rows([cell])
    assert {r["method"] for r in rows} == set(moe.METHODS)
    assert "local test" in moe.report.moe_table(rows, "p")


def test_paired_differences_are_per_seed_then_mean_and_std():
    """mixture − finetuned, seed by seed (a seed lacking one method is left out)."""
    rows = [{"skew": 0.8, "seed": s, "method": m, "local_acc": v}
            for s, m, v in [(0, "mixture", 0.50), (0, "finetuned", 0.48),
                            (1, "mixture", 0.40), (1, "finetuned", 0.41),
                            (2, "mixture", 0.60)]]
    got = moe.report.paired_difference(rows, "local_acc", "mixture", "finetuned", 0.8)
    d = np.array([2.0, -1.0])
    assert got == f"+2.0, -1.0 ({d.mean():+.1f} ± {d.std(ddof=1):.1f})"
    assert moe.report.paired_difference(rows, "local_acc", "mixture", "local", 0.8) == "–"


def test_client_splits_have_the_configured_sizes():
    labels = np.repeat(np.arange(10), 300)
    cfg = moe.MoeConfig(num_clients=10, train_size=100, val_size=100, test_size=50)
    s = moe.client_splits(cfg, labels, 0.8, seed=0)
    assert [len(x) for x in s.train] == [100] * 10
    assert [len(x) for x in s.val] == [100] * 10 and [len(x) for x in s.test] == [50] * 10
    assert moe.balanced_slice(labels, 3, 10).tolist()[:3] == [0, 1, 2]


@pytest.mark.slow
@pytest.mark.parametrize("name", CONFIGS)
def test_smoke_run_of_each_experiment_config(name, tmp_path):
    if not DATA.is_dir():
        pytest.skip(f"no data dir {DATA}")
    module = moe if name.startswith("moe") else abu
    argv = ["--config", str(ROOT / "experiments" / f"{name}.yaml"), "--out", str(tmp_path),
            "--data-dir", str(DATA), "--smoke"]
    if name == "abu_federated":  # its run dirs: never a shared /tmp left by an earlier run
        argv += ["--work-dir", str(tmp_path / "runs")]
    assert module.main(argv) == 0
    assert (tmp_path / "results.csv").is_file() and (tmp_path / "table.md").is_file()


def _tiny_abu_run(seed: int, held_out: int) -> tuple[dict, abu.AbuCifarConfig]:
    """Random 32x32 images (40 training, `held_out` validation and test) and a 4-step,
    2-seed, width-2 ABU_N config."""
    rs = np.random.RandomState(seed)
    split = lambda n: {"image": rs.randn(n, 32, 32, 3).astype(np.float32),
                       "label": rs.randint(0, 10, n).astype(np.int32)}
    arrays = {"train": split(40), "val": split(held_out), "test": split(held_out)}
    cfg = abu.AbuCifarConfig(activations=("abu_n",), seeds=(0, 1), width=2, steps=4,
                             batch_size=8, eval_every=2, eval_batch_size=10)
    return arrays, cfg


@pytest.mark.slow
def test_abu_run_killed_after_a_checkpoint_resumes_to_the_same_result(tmp_path, monkeypatch):
    """A run stopped right after its first validation checkpoint, then rerun, ends bitwise
    where the uninterrupted run ends (data order, dropout keys and Adam state continue)."""
    arrays, cfg = _tiny_abu_run(seed=0, held_out=10)
    quiet = lambda m: None
    ref = abu.train_activation(cfg, "abu_n", arrays, quiet)
    ckpt = tmp_path / "checkpoints" / "abu_n.pkl"
    save = abu.save_partial

    def save_then_die(*args):
        save(*args)
        raise KeyboardInterrupt

    monkeypatch.setattr(abu, "save_partial", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        abu.train_activation(cfg, "abu_n", arrays, quiet, checkpoint=ckpt)
    monkeypatch.setattr(abu, "save_partial", save)
    assert abu.load_partial(ckpt, cfg, "abu_n")["done"] == 2
    assert abu.load_partial(ckpt, cfg, "relu") is None  # another activation's state is not used
    logs = []
    out = abu.train_activation(cfg, "abu_n", arrays, logs.append, checkpoint=ckpt)
    assert any("resumed at step 2 of 4" in m for m in logs)
    val = ", ".join(f"{100 * v:.1f}" for v in ref["curve"][-1]["val_acc"])
    assert re.fullmatch(rf"  abu_n: step 4 of 4, validation accuracy {val} % \(\d+s\)",
                        logs[1])  # progress at every validation check
    assert out["test_acc"] == ref["test_acc"] and out["curve"] == ref["curve"]
    assert out["blend_weights"] == ref["blend_weights"]


def test_abu_seeds_mapped_train_the_same_runs_as_seeds_vmapped():
    """`seed_axis: map` (seeds one after another inside the step) is a lowering, not another
    experiment: the same curves, test accuracies and blend weights as the vmapped seeds."""
    arrays, cfg = _tiny_abu_run(seed=1, held_out=20)
    quiet = lambda m: None
    vmapped = abu.train_activation(cfg, "abu_n", arrays, quiet)
    mapped = abu.train_activation(dataclasses.replace(cfg, seed_axis="map"), "abu_n", arrays,
                                  quiet)
    assert mapped["test_acc"] == vmapped["test_acc"] and mapped["curve"] == vmapped["curve"]
    for layer, w in vmapped["blend_weights"].items():
        np.testing.assert_allclose(mapped["blend_weights"][layer], w, rtol=1e-5, atol=1e-6)


def test_abu_seed_axis_must_be_known(tmp_path, capsys):
    from fedjax_lm.cli import main

    bad = tmp_path / "abu.yaml"
    bad.write_text("name: x\nkind: cifar\nseed_axis: pmap\n")
    assert main(["abu", "--config", str(bad)]) == 2
    assert "seed_axis must be one of vmap, map, got 'pmap'" in capsys.readouterr().err


def test_abu_init_must_be_known(tmp_path, capsys):
    from fedjax_lm.cli import main

    bad = tmp_path / "abu.yaml"
    bad.write_text("name: x\nkind: cifar\ninit: he\n")
    assert main(["abu", "--config", str(bad)]) == 2
    assert "init must be one of flax, paper, got 'he'" in capsys.readouterr().err


def test_moe_ordered_pairs_need_k2_and_a_majority_partition(tmp_path, capsys):
    from fedjax_lm.cli import main

    bad = tmp_path / "moe.yaml"
    bad.write_text("name: x\nmajority_pairs: ordered\nk: 3\n")
    assert main(["moe", "--config", str(bad)]) == 2
    assert "majority_pairs: ordered needs partition: majority and k: 2" in capsys.readouterr().err
    bad.write_text("name: x\nmajority_pairs: shuffled\n")
    assert main(["moe", "--config", str(bad)]) == 2
    assert "majority_pairs must be dealt or ordered, got 'shuffled'" in capsys.readouterr().err


def test_moe_ordered_pairs_splits_on_cifar_sized_labels():
    """100 clients × 500 examples with the paper's ordered pairs fit a 5,800-per-class pool at
    every p of the grid, and client 11 = pair (1, 1) is a single-class client."""
    labels = np.repeat(np.arange(10), 5800)
    cfg = moe.MoeConfig(majority_pairs="ordered")
    for p in cfg.skews:
        s = moe.client_splits(cfg, labels, p, seed=0)
        assert [len(x) for x in s.train] == [100] * 100
    counts = np.bincount(labels[np.concatenate([s.train[11], s.val[11], s.test[11]])],
                         minlength=10)
    assert counts[1] == 500  # p = 1.0: every example of client (1, 1) is class 1


def test_report_only_needs_finished_cells(tmp_path, capsys):
    from fedjax_lm.cli import main

    cfg = str(ROOT / "experiments" / "moe_cifar10.yaml")
    assert main(["moe", "--config", cfg, "--out", str(tmp_path), "--report-only"]) == 2
    err = capsys.readouterr().err
    assert "no finished cells in" in err and "without --report-only first" in err
