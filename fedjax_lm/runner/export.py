"""`fedjax-lm export RUN_DIR --merged OUT`: a finished (or checkpointed) run's model as a
Hugging Face folder, LoRA merged into the base (`models.export`), with the tokenizer."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

from fedjax_lm.grid import ConfigError
from fedjax_lm.models.checkpoint import SAFETENSORS
from fedjax_lm.models.export import export_merged, unexportable
from fedjax_lm.runner.checkpoint import Checkpointer
from fedjax_lm.runner.experiment import Experiment, build_engine, load_model
from fedjax_lm.runner.peft import build_peft
from fedjax_lm.runner.report import check_run_files
from fedjax_lm.runner.rundir import DATA, read_json
from fedjax_lm.runner.train import check_base_of


def export_run(run_dir: Path, out: Path) -> tuple[int, Path]:
    """Write the newest checkpoint of `run_dir` to `out`: (its round, `out`)."""
    check_export_dir(Path(out))
    cfg = check_run_files(run_dir)
    if cfg is not None and (reason := unexportable(cfg.pooling)):
        raise ConfigError(f"cannot export {run_dir}: {reason}")
    rounds, model, params, tokenizer = run_model(run_dir)
    export_merged(model.config, params, out, tokenizer)
    return rounds, out


def check_export_dir(out: Path) -> None:
    """`out` must be new, empty, or an earlier export (overwritten): never a run directory or a
    folder of other files, whose config.json / model.safetensors an export would clobber."""
    if not out.is_dir() or not any(out.iterdir()):
        return
    if (out / "config.yaml").exists() or (out / "checkpoints").exists():
        raise ConfigError(f"--merged {out} is a run directory; export into a new folder")
    if not (out / SAFETENSORS).is_file():
        raise ConfigError(f"--merged {out} holds other files (it is not an earlier export); "
                          "export into a new or empty folder")


def run_model(run_dir: Path):
    """(round, model, params, tokenizer) of the newest checkpoint of `run_dir` (unmerged)."""
    cfg = check_run_files(run_dir)
    data = read_json(run_dir / DATA)
    ckpt = Checkpointer(run_dir / "checkpoints")
    try:
        rounds = ckpt.latest_round()
        if cfg is None or data is None or not rounds:
            raise ConfigError(f"{run_dir} holds no checkpointed run (config.yaml, data.json and "
                              "checkpoints/); export a run directory that trained a round")
        model, params, tokenizer = load_model(cfg, data["num_classes"])
        # The round's model needs no data: an experiment with none builds its engine.
        exp = Experiment(cfg=cfg, model=model, params=params, train={}, test={},
                         partition=[np.zeros(0, np.int64)] * cfg.clients, test_shards=[],
                         num_classes=data["num_classes"], steps_per_round=1, source="",
                         peft=build_peft(cfg, params, cfg.clients))
        check_base_of(run_dir, cfg, exp, rounds_done=rounds, write=False)
        engine = build_engine(cfg, exp)
        state = engine.init(params, jax.random.key(cfg.seed))
        store = engine.new_store(params, cfg.clients) if engine.algorithm.stateful else None
        rounds, state, _ = ckpt.restore_trainable(exp.peft.trainable, state, store)
    finally:
        ckpt.close()
    return rounds, model, jax.device_get(state.params), tokenizer
