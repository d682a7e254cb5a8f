"""Runs, sweeps and reports: the loop over rounds and everything written to disk."""

from fedjax_lm.runner.config import ConfigError, Preset, RunConfig, from_dict, load_preset
from fedjax_lm.runner.train import TrainingError, train

__all__ = ["ConfigError", "Preset", "RunConfig", "TrainingError", "from_dict", "load_preset",
           "train"]
