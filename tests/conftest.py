"""Test-wide setup: 8 fake CPU devices so mesh / pmap backends run multi-device on a laptop.

XLA reads the flag when jax initialises its backends, so it must be set before any test
module touches a device; conftest is imported first.
Also the fixtures that let tests share work: compiled programs across in-process runs
(`shared_compiles`) and one trained tiny run directory (`trained_run`, `copy_trained_run`).
"""

import importlib
import importlib.util
import json
import os
import shutil
import signal
import sys
from pathlib import Path

import pytest

# A suite started as a background job (`make test &` in a script) inherits SIGINT ignored, and
# so would every process it starts; the Ctrl-C tests need Python's own handler. A handler set
# here becomes SIG_DFL in child processes, where Python installs its handler again.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

_FLAG = "--xla_force_host_platform_device_count=8"
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
# Tests run tiny programs once: LLVM's optimisation of XLA:CPU's fused kernels (dropout's
# threefry above all) costs more than it saves. Level 0 compiles the tiny round in ~6 s instead
# of ~20 s; values agree with the optimised build to float tolerance, the only comparison a
# test makes across builds (bitwise checks compare two runs of this same build).
_OPT = "--xla_backend_optimization_level"
if _OPT not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += f" {_OPT}=0"
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

# A persistent compilation cache shared by this session's tests and the subprocesses they
# start (CLI runs, multi-process runs): the same program compiles once per test session.
_CACHE = os.path.join(os.path.dirname(__file__), "..", ".pytest_cache", "jax_compilation_cache")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.abspath(_CACHE))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

# Config fields that choose the data, its split and the loop around the round, not the
# programs a run compiles (a program's input shapes are part of jax's own cache key).
_NOT_PROGRAM_FIELDS = ("out", "task", "data_dir", "train_file", "test_file", "text_column",
                       "label_column", "label_names", "num_labels", "max_train_examples",
                       "max_test_examples", "partition", "alpha", "p", "k", "beta", "rounds",
                       "eval_every", "eval_batch_size", "checkpoint_every", "nonfinite",
                       "target_accuracy")


@pytest.fixture(scope="session")
def _programs() -> dict:
    return {}


@pytest.fixture
def shared_compiles(_programs: dict):
    """In-process runs that build the same model and algorithm share one initial model, engine
    and predict function, so their jitted programs are traced and compiled once per session,
    not per run (jax's caches live on those objects). Data, run directories and every check
    stay each run's own; a model folder is always loaded afresh."""
    import jax.numpy as jnp
    from jax import tree

    train_module = importlib.import_module("fedjax_lm.runner.train")
    experiment = importlib.import_module("fedjax_lm.runner.experiment")
    build_engine, make_predict = train_module.build_engine, train_module.make_predict
    load_model = experiment.load_model

    def cached(kind, key, build):
        key = (kind, key)
        if key not in _programs:
            _programs[key] = build()
        return _programs[key]

    def shared_load_model(cfg, num_labels):
        if not cfg.model.startswith("preset:"):
            return load_model(cfg, num_labels)
        from fedjax_lm.runner.peft import model_overrides  # the adapters shape the model too

        key = (cfg.model, cfg.model_type, cfg.hidden_act, cfg.attend_to_padding, cfg.max_length,
               cfg.seed, num_labels, json.dumps(model_overrides(cfg), default=str))
        model, params, tokenizer = cached("model", key, lambda: load_model(cfg, num_labels))
        return model, tree.map(jnp.array, params), tokenizer  # a copy: rounds donate buffers

    def shared_build_engine(cfg, exp):
        fields = {k: v for k, v in cfg.to_dict().items() if k not in _NOT_PROGRAM_FIELDS}
        key = (json.dumps(fields, sort_keys=True, default=str), repr(exp.model.config),
               exp.num_clients)
        return cached("engine", key, lambda: build_engine(cfg, exp))

    def shared_predict(model):
        return cached("predict", repr(model.config), lambda: make_predict(model))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(experiment, "load_model", shared_load_model)
        mp.setattr(train_module, "build_engine", shared_build_engine)
        mp.setattr(train_module, "make_predict", shared_predict)
        yield


# `fedjax-lm train` flags of a one-round run on the tiny preset, and of the session's trained run
TINY_ARGV = ["--model", "preset:tiny", "--task", "synthetic", "--max-train-examples", "96",
             "--max-test-examples", "48", "--max-length", "16", "--batch-size", "8",
             "--local-epochs", "1", "--rounds", "1", "--no-progress"]
TRAINED_ARGV = [*TINY_ARGV[:-3], "--rounds", "2", "--no-progress"]


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 2-round tiny run (`fedjax-lm train TRAINED_ARGV`), trained once per session:
    tests copy it (`copy_trained_run`) instead of training their own."""
    from fedjax_lm.cli import main

    out = tmp_path_factory.mktemp("trained") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEDJAX_LM_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        assert main(["train", *TRAINED_ARGV, "--out", str(out)]) == 0
    return out


@pytest.fixture
def copy_trained_run(trained_run: Path):
    """`copy(dest)`: a fresh copy of the session's trained run at `dest`; its final.json."""

    def copy(dest: Path) -> dict:
        shutil.copytree(trained_run, dest)
        (dest / ".lock").unlink(missing_ok=True)
        return json.loads((dest / "final.json").read_text())

    return copy


@pytest.fixture(scope="session")
def experiment_script():
    """`load(name)`: experiments/<name>.py imported as a module (the experiment scripts are
    not a package)."""

    def load(name: str):
        path = Path(__file__).resolve().parents[1] / "experiments" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules.setdefault(name, module)  # dataclasses look their module up by name
        spec.loader.exec_module(module)
        return module

    return load
