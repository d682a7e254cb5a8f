"""`sweep --vectorize`: which cells share a program, and that a shared program's cells equal
the same cells run alone with `train` (metrics, parameters), resumed included."""

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import jax
import numpy as np
import pytest

from fedjax_lm.runner import vectorized
from fedjax_lm.runner.checkpoint import Checkpointer
from fedjax_lm.runner.checks import from_dict
from fedjax_lm.runner.presets import Preset, VectorizeOptions, vectorize_options
from fedjax_lm.runner.sweep import expand, run_sweep
from fedjax_lm.runner.train import train

TINY = {"model": "preset:tiny", "task": "synthetic", "max_train_examples": 96,
        "max_test_examples": 48, "max_length": 16, "batch_size": 8, "local_epochs": None,
        "local_steps": 2, "rounds": 2, "client_optimizer": "adam", "lr": 1e-3}


def _cells(grid: dict, tmp: Path, **base):
    return expand(Preset("t", {**TINY, **base}, grid), {}, tmp)


def test_cells_of_one_shape_share_a_program_and_padding_is_bounded():
    """Paper 1 at one epoch: C x S is constant, so padding C = 1 up to C = 2 would double the
    work: seeds share a program, client counts do not. At fixed S they do, within the bound."""
    cfgs = [SimpleNamespace(cohort_size=None, clients=c) for c in (1, 1, 2, 2, 4)]
    epochs = [SimpleNamespace(steps_per_round=8 // c.clients) for c in cfgs]
    assert vectorized.split_by_padding(cfgs, epochs, 1.5) == [[4], [2, 3], [0, 1]]
    fixed = [SimpleNamespace(steps_per_round=2) for _ in cfgs]
    assert vectorized.split_by_padding(cfgs, fixed, 1.5) == [[4, 2, 3], [0, 1]]
    assert vectorized.split_by_padding(cfgs, fixed, 4.0) == [[4, 2, 3, 0, 1]]


def test_cells_beyond_padding_or_unsupported_run_alone_with_the_reason(tmp_path):
    cells = _cells({"max_length": [16, 32]}, tmp_path)
    cells += _cells({"seed": [0, 1]}, tmp_path / "dp", dp_clip=1.0)
    groups, warnings = vectorized.plan(cells, VectorizeOptions(enabled=True))
    assert [len(g.cells) for g in groups] == [1, 1, 1, 1]
    assert warnings == [
        "seed=0, seed=1 run(s) alone: DP-FedAvg (dp_clip) is not vectorized",
        "max_length=16, max_length=32 run(s) alone, each its own program: they differ in "
        "max_length, beyond seed, lr, server_lr, clients, cohort_size, partition, alpha, p, k, "
        "beta"]


def test_planned_groups_hold_shapes_and_load_the_same_weights_when_they_run(tmp_path):
    """A sweep's queued cells must not each hold a model: planning keeps the params' shapes,
    and a group about to run loads exactly the params `build_experiment` made."""
    cells = _cells({"seed": [0, 1]}, tmp_path)
    (group,), _ = vectorized.plan(cells, VectorizeOptions(enabled=True))
    for exp in group.exps:
        assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(exp.params))
    loaded = group.with_weights()
    for cfg, exp in zip(cells, loaded.exps, strict=True):
        built = vectorized.build_experiment(cfg).params
        jax.tree.map(np.testing.assert_array_equal, exp.params, built)
    assert loaded.with_weights().exps[0] is loaded.exps[0]  # loaded once


def test_plain_fedavg_server_lr_is_part_of_the_program(tmp_path):
    a, b = _cells({"server_lr": [1.0, 0.5]}, tmp_path)
    assert vectorized.program_key(a) != vectorized.program_key(b)  # 1.0: no server optimizer
    c, d = _cells({"server_lr": [1.0, 0.5]}, tmp_path, server_optimizer="fedavgm")
    assert vectorized.program_key(c) == vectorized.program_key(d)


def test_vectorize_options_from_yaml():
    assert vectorize_options(True, "v") == VectorizeOptions(enabled=True)
    opts = vectorize_options({"padding": 2, "memory": "1GiB"}, "v")
    assert (opts.enabled, opts.padding, opts.memory) == (True, 2.0, 2**30)
    with pytest.raises(Exception, match="padding must be a number >= 1"):
        vectorize_options({"padding": 0.5}, "v")


def _same_metrics(vec: Path, alone: Path) -> list[dict]:
    """Each round's metrics of a vectorized cell equal its run alone (1e-6); its rows."""
    rows = [[json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
            for d in (vec, alone)]
    for a, b in zip(*rows, strict=True):
        for key in ("train_loss", "update_norm", "eval_loss", "eval_accuracy"):
            assert abs(a[key] - b[key]) <= 1e-6, (alone, key)
    return rows[0]


def _params(run_dir: Path, cfg) -> dict:
    """The final server params of a run, restored from its last checkpoint."""
    from fedjax_lm import federated as fl
    from fedjax_lm.runner.experiment import build_algorithm, build_experiment

    exp = build_experiment(cfg)
    state = fl.init_state(build_algorithm(cfg, exp), exp.params, jax.random.key(cfg.seed))
    ckpt = Checkpointer(run_dir / "checkpoints")
    try:
        return ckpt.restore(state)[1].params
    finally:
        ckpt.close()


@pytest.mark.slow
def test_vectorized_sweep_equals_each_cell_alone_and_resumes(tmp_path, capsys):
    """Four cells (2 client counts x 2 seeds, different lrs) as one padded program, against
    each run alone with `train`. Then more rounds, with one cell rolled back a round: it
    catches up alone, the group continues together, and still equals the cells alone."""
    grid = {"clients": [3, 2], "seed": [0, 1]}
    preset = Preset("t", {**TINY, "rounds": 1}, grid)
    opts = VectorizeOptions(enabled=True, padding=2.0)
    run_sweep(preset, {"lr": 2e-3}, tmp_path / "vec", progress=False, vectorize=opts)
    assert "4 cell(s) as one program, padded to 3 clients" in capsys.readouterr().out
    # resume with two rounds more; one cell lost its last round
    cell = tmp_path / "vec" / "clients=2,seed=1"
    shutil.rmtree(cell)
    preset = Preset("t", {**TINY, "rounds": 3}, grid)
    run_sweep(preset, {"lr": 2e-3}, tmp_path / "vec", progress=False, vectorize=opts)
    assert "clients=2,seed=1 is at round 0, its group at 1" in capsys.readouterr().out
    for cfg in expand(preset, {"lr": 2e-3}, tmp_path / "alone"):
        alone = train(cfg, progress=False)
        run = tmp_path / "vec" / Path(cfg.out).name
        vec = json.loads((run / "final.json").read_text())
        assert vec["rounds"] == alone["rounds"] == 3
        assert [r["round"] for r in _same_metrics(run, Path(cfg.out))] == [1, 2, 3]
        mine, theirs = _params(run, cfg), _params(Path(cfg.out), cfg)
        # Parameters: float32 rounding of a reordered sum, carried through 3 rounds of Adam,
        # which divides by the gradient's own scale, so where a gradient is (nearly) zero its
        # rounding noise becomes a step of up to lr (attention key biases: an exactly-zero
        # gradient; rare tokens' embedding rows): measured up to 3e-5 = 1.5% of lr in single
        # coordinates. A real difference (a wrong weight, a padded client counted) moves whole
        # tensors by ~lr per step: bound the worst coordinate by 5% of lr and the mean by 0.1%.
        for x, y in zip(jax.tree.leaves(mine), jax.tree.leaves(theirs), strict=True):
            d = np.abs(np.asarray(x) - np.asarray(y))
            assert d.max() <= 0.05 * 2e-3 and d.mean() <= 1e-3 * 2e-3, cfg.out
    assert from_dict(vec["config"]).rounds == 3


def test_compile_ahead_compiles_in_order_on_a_thread_and_raises_where_taken(monkeypatch):
    import threading

    compiled = []

    def fake_compile(group):
        compiled.append((group.cells[0].out, threading.current_thread().name))
        if group.cells[0].out == "b":
            raise ValueError("XLA said no")
        return group.cells[0].out

    monkeypatch.setattr(vectorized, "compile_group", fake_compile)
    groups = [vectorized.Group([SimpleNamespace(out=name)], "") for name in "abc"]
    with vectorized.CompileAhead(groups) as ahead:
        assert ahead.take(groups[0]) == "a"
        with pytest.raises(ValueError, match="XLA said no"):
            ahead.take(groups[1])
        assert ahead.take(groups[2]) == "c"
        other = vectorized.Group([SimpleNamespace(out="d")], "")  # changed cells: compiled here
        assert ahead.take(other) == "d"
    assert [c[0] for c in compiled] == ["a", "b", "c", "d"]
    assert {name for _, name in compiled[:3]} == {"compile-ahead"}
    assert compiled[3][1] == threading.current_thread().name


def test_compile_ahead_stays_one_group_ahead_of_the_caller(monkeypatch):
    import time

    compiled = []

    def fake_compile(group):
        compiled.append(group.cells[0].out)
        return group.cells[0].out

    def settled(n: int) -> list[str]:
        deadline = time.monotonic() + 30
        while len(compiled) < n and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)  # would a further compile start now?
        return list(compiled)

    monkeypatch.setattr(vectorized, "compile_group", fake_compile)
    groups = [vectorized.Group([SimpleNamespace(out=name)], "") for name in "abcd"]
    with vectorized.CompileAhead(groups, lookahead=1) as ahead:
        assert settled(2) == ["a", "b"]  # the caller is at a: b may compile, c must wait
        assert ahead.take(groups[2]) == "c"  # taking c moves the caller to c
        assert settled(4) == ["a", "b", "c", "d"]
    groups = [vectorized.Group([SimpleNamespace(out=n)], "") for n in "efg"]
    with vectorized.CompileAhead(groups, lookahead=0):
        assert settled(1)[-1] == "e"
    time.sleep(0.3)  # left with its worker waiting for the caller: nothing more compiles
    assert compiled == ["a", "b", "c", "d", "e"]


@pytest.mark.slow
def test_vectorized_lora_cells_equal_each_cell_alone(tmp_path, capsys):
    """LoRA (one rank, FedIT) clients share a program across seeds and lrs, BitFit clients
    with frozen bottom layers another; each cell's metrics and parameters equal its run alone,
    and per-client ranks still run alone."""
    base = {**TINY, "rounds": 2}
    grid = {"peft": ["lora", "bitfit"], "seed": [0, 1], "lr": [1e-3, 3e-3]}
    opts = VectorizeOptions(enabled=True)
    run_sweep(Preset("t", base, grid), {"freeze_layers": 1}, tmp_path / "vec", progress=False,
              vectorize=opts)
    assert capsys.readouterr().out.count("4 cell(s) as one program") == 2
    for cfg in expand(Preset("t", base, grid), {"freeze_layers": 1}, tmp_path / "alone"):
        train(cfg, progress=False)
        run = tmp_path / "vec" / Path(cfg.out).name
        _same_metrics(run, Path(cfg.out))
        for x, y in zip(jax.tree.leaves(_params(run, cfg)),
                        jax.tree.leaves(_params(Path(cfg.out), cfg)), strict=True):
            d = np.abs(np.asarray(x) - np.asarray(y))  # bounds as in the test above
            assert d.max() <= 0.05 * cfg.lr and d.mean() <= 1e-3 * cfg.lr, cfg.out
    mixed = _cells({"seed": [0, 1]}, tmp_path / "mixed", peft="lora", lora_rank=4,
                   lora_ranks=("2", "4"))
    groups, warnings = vectorized.plan(mixed, opts)
    assert [len(g.cells) for g in groups] == [1, 1]
    assert warnings == ["seed=0, seed=1 run(s) alone: per-client LoRA ranks (lora_ranks) is not "
                        "vectorized"]


def test_partitions_share_a_program_and_equal_each_cell_alone(tmp_path, capsys):
    """IID against non-IID is data, not program: the partitions' cells join the seeds' program
    (one plan line), and each cell's metrics equal its run alone."""
    base = {**TINY, "rounds": 1, "clients": 3}
    grid = {"partition": ["iid", "dirichlet"], "alpha": [0.5], "seed": [0, 1]}
    run_sweep(Preset("t", base, grid), {}, tmp_path / "vec", progress=False,
              vectorize=VectorizeOptions(enabled=True))
    assert "4 cell(s) as one program, padded to 3 clients x 2 local steps" in \
        capsys.readouterr().out
    for cfg in expand(Preset("t", base, grid), {}, tmp_path / "alone"):
        train(cfg, progress=False)
        assert len(_same_metrics(tmp_path / "vec" / Path(cfg.out).name, Path(cfg.out))) == 1
    iid, dirichlet = (json.loads((tmp_path / "vec" / f"partition={p},alpha=0.5,seed=0" /
                                  "metrics.jsonl").read_text()) for p in ("iid", "dirichlet"))
    assert iid["train_loss"] != dirichlet["train_loss"]  # the cells did get different data


def _group(model, seeds, mask):
    cells = [SimpleNamespace(model=model, seed=s) for s in seeds]
    return vectorized.Group(cells, "", [SimpleNamespace(peft=SimpleNamespace(trainable=mask))])


def test_the_frozen_base_is_planned_shared_where_no_seed_draws_it():
    """Seeds draw a preset's every weight, a pretrained model's head and LoRA adapters; what
    no cell's seed draws is shared. (FFA-LoRA's frozen `lora_a` is drawn, so stays per cell.)"""
    mask = {"layers": {"0": {"query": {"kernel": False, "lora_a": False, "lora_b": True}}},
            "head": {"kernel": True}}
    frozen = {"layers": {"0": {"query": {"kernel": True, "lora_a": True, "lora_b": False}}},
              "head": {"kernel": False}}
    assert vectorized.planned_shared(_group("preset:tiny", [0, 1], mask)) is None
    assert vectorized.planned_shared(_group("preset:tiny", [3, 3], mask)) == frozen
    assert vectorized.planned_shared(_group("nreimers/MiniLM", [0, 1], mask)) == {
        "layers": {"0": {"query": {"kernel": True, "lora_a": False, "lora_b": False}}},
        "head": {"kernel": False}}
    assert vectorized.planned_shared(_group("nreimers/MiniLM", [0, 1], None)) is None


def test_shared_base_cells_equal_each_cell_alone_and_a_wrong_plan_is_caught(tmp_path, capsys):
    """LoRA cells of one seed (two lrs): the frozen base enters their program once, and each
    cell's metrics equal its run alone. A plan that names a leaf the cells do not share is
    corrected from the values before any round."""
    base = {**TINY, "rounds": 2, "peft": "lora", "freeze_layers": 1}
    grid = {"lr": [1e-3, 3e-3]}
    (group,), _ = vectorized.plan(_cells(grid, tmp_path / "plan", **base),
                                  VectorizeOptions(enabled=True))
    shared = vectorized.planned_shared(group)
    mask = group.exps[0].peft.trainable
    assert jax.tree.leaves(shared) == [not t for t in jax.tree.leaves(mask)]
    run_sweep(Preset("t", base, grid), {}, tmp_path / "vec", progress=False,
              vectorize=VectorizeOptions(enabled=True))
    assert "2 cell(s) as one program" in capsys.readouterr().out
    for cfg in expand(Preset("t", base, grid), {}, tmp_path / "alone"):
        train(cfg, progress=False)
        assert len(_same_metrics(tmp_path / "vec" / Path(cfg.out).name, Path(cfg.out))) == 2
    loaded = group.with_weights()
    one, two = (jax.tree.leaves(e.params) for e in loaded.exps)
    assert all(x is y for x, y in zip(one, two, strict=True))  # one seed: held once
    program = vectorized._program(loaded)
    states = vectorized._initial_states(loaded)
    flat, treedef = jax.tree.flatten(states[1].params)
    flat[0] = flat[0] + 1  # the first (frozen) leaf now differs between the cells
    states[1] = states[1].replace(params=jax.tree.unflatten(treedef, flat))
    checked = vectorized._checked(program, loaded, states)
    assert jax.tree.leaves(checked.shared) == [False] + jax.tree.leaves(shared)[1:]
    assert "some frozen leaves differ between the cells" in capsys.readouterr().out
