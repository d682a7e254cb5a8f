"""`fedjax-lm moe` / `fedjax-lm abu` refuse a bad config up front: one stderr line naming the
field and what it takes, exit status 2, no traceback, nothing trained and no --out written.
No test here trains (or loads data): every refusal comes from `check_config`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedjax_lm.grid import ConfigError
from fedjax_lm.models.hidden_act import hidden_act_names
from fedjax_lm.personalize import abu, moe
from fedjax_lm.personalize.config import load_config
from fedjax_lm.personalize.fedavg import FedAvgConfig, run_fedavg

ROOT = Path(__file__).resolve().parents[2]
MOE = "name: x\nnum_clients: 4\neval_clients: 2\nfedavg: {cohort_size: 2}\n"
CIFAR = "name: x\nkind: cifar\n"
FED = "name: x\nkind: federated\nrun: {task: ag_news, model: 'preset:tiny'}\n"
VALID_ACTS = ", ".join(abu.MODEL_ACTIVATIONS)

CASES = [
    # F9: eval clients are drawn from the population
    ("moe", MOE + "eval_clients: 10\n",
     "eval_clients must be at most num_clients=4, got 10: the evaluation clients are drawn "
     "from the population; lower eval_clients or raise num_clients"),
    # F17: a cohort larger than the population was silently clamped
    ("moe", MOE + "fedavg: {cohort_size: 10}\n",
     "fedavg.cohort_size must be at most 4 (num_clients=4), got 10: a cohort cannot be larger "
     "than the population; lower fedavg.cohort_size or raise num_clients"),
    ("moe", "name: x\nnum_clients: 10\neval_clients: 2\nopt_out_fraction: 0.5\n"
     "fedavg: {cohort_size: 6}\n",
     "fedavg.cohort_size must be at most 5 (num_clients=10 less the 5 that opt out), got 6: a "
     "cohort cannot be larger than the population; lower fedavg.cohort_size or raise "
     "num_clients"),
    # F19: the size itself is named, not the split fractions made from it
    ("moe", MOE + "train_size: -5\n", "train_size must be a whole number >= 1, got -5"),
    ("moe", MOE + "val_size: 0\n", "val_size must be a whole number >= 1, got 0"),
    ("moe", MOE + "test_size: 2.5\n", "test_size must be a whole number >= 1, got 2.5"),
    ("moe", MOE + "num_clients: 0\n", "num_clients must be a whole number >= 1, got 0"),
    ("moe", MOE + "skews: [1.5]\n", "skews (majority p) must be a finite number in [0, 1], "
                                    "got 1.5"),
    ("moe", MOE + "partition: dirichlet\nskews: [0]\n",
     "skews (dirichlet alpha) must be a finite number > 0, got 0"),
    ("moe", MOE + "partition: iid\n", "partition must be one of majority, dirichlet, got 'iid'"),
    ("moe", MOE + "seeds: []\n", "seeds must be a non-empty list of whole numbers, got ()"),
    ("moe", MOE + "opt_out_fraction: 1.0\n",
     "opt_out_fraction must be a finite number in [0, 1), got 1.0"),
    ("moe", MOE + "local: {lr: 0}\n", "local.lr must be a finite number > 0, got 0"),
    ("moe", MOE + "mixture: {patience: 0}\n",
     "mixture.patience must be a whole number >= 1, got 0"),
    ("moe", MOE + "finetune: {keep_initial: 1}\n",
     "finetune.keep_initial must be true or false, got 1"),
    ("moe", MOE + "fedavg: {cohort_size: 2, rounds: 0}\n",
     "fedavg.rounds must be a whole number >= 1, got 0"),
    ("moe", MOE + "fedavg: {cohort_size: 2, backend: gpu}\n",
     "fedavg.backend must be one of loop, vmap, mesh, pmap, got 'gpu'"),
    # F10: every numeric field of the cifar config, and the activation names
    ("abu", CIFAR + "activations: [reluu]\n",
     f"unknown activation 'reluu' in activations; valid: {VALID_ACTS}"),
    ("abu", CIFAR + "activations: relu\n",
     "activations must be a non-empty list of activation names, got 'relu'"),
    ("abu", CIFAR + "activations: [relu, relu]\n",
     "activations lists 'relu' more than once; remove the repeat"),
    ("abu", CIFAR + "steps: 0\n", "steps must be a whole number >= 1, got 0"),
    ("abu", CIFAR + "val_fraction: 1.0\n", "val_fraction must be a finite number in (0, 1), "
                                           "got 1.0"),
    ("abu", CIFAR + "val_fraction: 0\n", "val_fraction must be a finite number in (0, 1), "
                                         "got 0"),
    ("abu", CIFAR + "width: 0\n", "width must be a whole number >= 1, got 0"),
    ("abu", CIFAR + "batch_size: -1\n", "batch_size must be a whole number >= 1, got -1"),
    ("abu", CIFAR + "eval_batch_size: 0\n", "eval_batch_size must be a whole number >= 1, "
                                            "got 0"),
    ("abu", CIFAR + "eval_every: 0\n", "eval_every must be a whole number >= 1, got 0"),
    ("abu", CIFAR + "dropout_rate: 1.0\n", "dropout_rate must be a finite number in [0, 1), "
                                           "got 1.0"),
    ("abu", CIFAR + "weight_decay: -0.1\n", "weight_decay must be a finite number >= 0, "
                                            "got -0.1"),
    ("abu", CIFAR + "max_train: 0\n", "max_train must be a whole number >= 1 (or unset), "
                                      "got 0"),
    ("abu", CIFAR + "max_test: -3\n", "max_test must be a whole number >= 1 (or unset), "
                                      "got -3"),
    ("abu", CIFAR + "seeds: []\n", "seeds must be a non-empty list of whole numbers, got ()"),
    ("abu", CIFAR + "seeds: [-1]\n", "seeds must be whole numbers in [0, 2147483647], got -1"),
    ("abu", CIFAR + "seeds: [0, 0]\n", "seeds lists 0 more than once; remove the repeat"),
    # F16: a negative or non-finite learning rate
    ("abu", CIFAR + "lr: -1.0\n", "lr must be a finite number > 0, got -1.0"),
    ("abu", CIFAR + "lr: .nan\n", "lr must be a finite number > 0, got nan"),
    ("abu", CIFAR + "lr: 1e-3\n", "lr must be a finite number > 0, got '1e-3' (YAML reads "
                                  "1e-3 as text: write it with a decimal point, e.g. 1.0e-3)"),
    # F15: a mistyped kind no longer runs as federated
    ("abu", "name: x\nkind: federatd\n", "kind must be one of cifar, federated, got 'federatd'"),
    # F19 (abu): every arm's activation before the first arm trains, then each arm's run
    ("abu", FED + "arms: {gelu: null, abu_n: abu_n, abu_x: abu_x}\n",
     "arms.abu_x: unknown activation 'abu_x'; valid: null (the model's own), "
     + ", ".join(hidden_act_names())),
    ("abu", FED + "arms: [gelu]\n", "arms must be a non-empty mapping of arm name to activation "
                                    "(null: the model's own), got ('gelu',)"),
    ("abu", "name: x\nkind: federated\nrun: {task: ag_news, model: 'preset:tiny', lr: -1.0}\n",
     "run (arm gelu, seed 0): lr must be > 0, got -1.0"),
]


@pytest.mark.parametrize(("command", "text", "message"), CASES,
                         ids=[f"{c}-{i}" for i, (c, _, _) in enumerate(CASES)])
def test_bad_config_is_one_line_exit_2_before_anything_runs(command, text, message, tmp_path,
                                                            capsys):
    from fedjax_lm.cli import main

    config = tmp_path / "c.yaml"
    config.write_text(text)
    out = tmp_path / "out"
    assert main([command, "--config", str(config), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err == f"fedjax-lm {command}: error: {message}\n"
    assert not out.exists()  # refused before any run began


@pytest.mark.parametrize("name", ["moe_cifar10", "moe_cifar10_optout", "moe_text",
                                  "abu_cifar10", "abu_cifar10_long", "abu_federated"])
def test_shipped_configs_pass_the_checks(name):
    module = moe if name.startswith("moe") else abu
    cls = moe.MoeConfig if name.startswith("moe") else (
        abu.AbuCifarConfig if name.startswith("abu_cifar10") else abu.AbuFederatedConfig)
    for smoke in (False, True):
        module.check_config(load_config(cls, ROOT / "experiments" / f"{name}.yaml", smoke=smoke))


def test_run_fedavg_never_clamps_the_cohort():
    cfg = FedAvgConfig(cohort_size=5)
    with pytest.raises(ConfigError, match=r"fedavg.cohort_size must be in \[1, 3\]"):
        run_fedavg(None, None, {}, [np.arange(2)] * 3, np.arange(3), cfg, seed=0)


def test_a_global_test_slice_larger_than_a_class_is_a_config_error():
    with pytest.raises(ConfigError, match=r"global_test_per_class must be at most 3 \(class 1"):
        moe.balanced_slice(np.array([0, 0, 0, 0, 1, 1, 1]), 4, 2)


@pytest.mark.parametrize("argv, message", [
    (["fedjax_lm.personalize.abu", "--config", "{tmp}/none.yaml"],
     "python -m fedjax_lm.personalize.abu: error: config file not found: {tmp}/none.yaml"),
    (["fedjax_lm.personalize.moe", "--config", "{tmp}/none.yaml"],
     "python -m fedjax_lm.personalize.moe: error: config file not found: {tmp}/none.yaml"),
    (["fedjax_lm.personalize.abu"],  # a usage error is one line too, not argparse's usage
     "python -m fedjax_lm.personalize.abu: error: the following arguments are required: "
     "--config (see python -m fedjax_lm.personalize.abu --help)"),
    (["fedjax_lm.bench.pfl_cifar10", "--out", "{tmp}", "--report-only"],
     "python -m fedjax_lm.bench.pfl_cifar10: error: no {tmp}/compare.json: run the comparison "
     "first"),
    (["fedjax_lm.bench.pfl_cifar10", "--out", "{tmp}", "--data-dir", "{tmp}/none"],
     "python -m fedjax_lm.bench.pfl_cifar10: error: data directory {tmp}/none does not exist "
     "(from data_dir / $FEDJAX_LM_DATA_DIR)"),
])
def test_module_entry_points_print_bad_input_as_one_line(argv, message, tmp_path):
    """The commands the experiment configs print (`python -m ...`) answer like `fedjax-lm`."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", *[a.format(tmp=tmp_path) for a in argv]],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == message.format(tmp=tmp_path)
