"""The task registry: name -> loader spec. Loader modules import it and register themselves.

Kept apart from `tasks.py` (which holds `load_task` and the text loaders and imports every
loader module) so that loader modules depend on the registry only, never on each other.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedjax_lm.data.sources import load_hub
from fedjax_lm.data.task_data import TaskData

PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class LoadContext:
    """What every loader gets: the resolved data dir (None = hub), a file override, cache, and
    the seed of a task registered `seeded` (None for the others: their loads are shared across
    seeds, see `tasks.load_task`)."""

    name: str
    root: Path | None
    path: Path | None
    cache_dir: PathLike | None
    loader_seed: int | None

    @property
    def seed(self) -> int:
        if self.loader_seed is None:
            raise TypeError(f"task {self.name!r} reads its seed: register it with seeded=True")
        return self.loader_seed


Loader = Callable[..., TaskData]


@dataclass(frozen=True)
class TaskSpec:
    """A registered task: its loader, files under the data dir, and hub id (None = no hub)."""

    name: str
    loader: Loader
    files: tuple[str, ...]
    hub_id: str | None
    needs_data: bool = True
    groups: bool = False  # its examples carry natural client keys (partition "natural")
    seeded: bool = False  # the loader reads `ctx.seed` (seeded splits, generated data)


TASKS: dict[str, TaskSpec] = {}


def register_task(
    name: str, files: tuple[str, ...] = (), hub_id: str | None = None, needs_data: bool = True,
    groups: bool = False, seeded: bool = False,
) -> Callable[[Loader], Loader]:
    """Decorator adding a loader to the registry."""

    def wrap(loader: Loader) -> Loader:
        TASKS[name] = TaskSpec(name, loader, files, hub_id, needs_data, groups, seeded)
        return loader

    return wrap


def list_tasks() -> list[str]:
    """The registered task names."""
    return sorted(TASKS)


def hub_dataset(ctx: LoadContext, config: str | None = None) -> Any:
    """The task's Hugging Face dataset, or the clear DataError when offline."""
    spec = TASKS[ctx.name]
    return load_hub(ctx.name, spec.hub_id, spec.files, config=config, cache_dir=ctx.cache_dir)
