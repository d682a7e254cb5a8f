"""Runs, sweeps and reports: the loop over rounds and everything written to disk."""

from fedjax_lm.grid import ConfigError
from fedjax_lm.runner.checks import from_dict
from fedjax_lm.runner.config import RunConfig
from fedjax_lm.runner.presets import Preset, load_preset
from fedjax_lm.runner.train import TrainingError, train

__all__ = ["ConfigError", "Preset", "RunConfig", "TrainingError", "from_dict", "load_preset",
           "train"]
