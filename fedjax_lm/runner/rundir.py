"""Guards on a run directory, so that what it holds is never mislabelled: one process writes it
at a time, and a rerun continues only the run whose config, data and rounds it holds.

A directory in which nothing was trained yet (no checkpoint, no final.json: setup failed, or
round 1 stopped) binds nothing: a corrected command reuses it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fedjax_lm.grid import ConfigError, ResumeError, check_same_config, load_yaml
from fedjax_lm.io import write_json
from fedjax_lm.runner import privacy
from fedjax_lm.runner.checks import from_dict
from fedjax_lm.runner.config import RESUMABLE_FIELDS, RunConfig
from fedjax_lm.runner.digest import weights_identity
from fedjax_lm.runner.report import check_run_files

LOCK = ".lock"  # flock'ed by the run writing the directory; holds "pid P on HOST"
DATA = "data.json"  # the fingerprint of the data the run trains on
BASE = "base.json"  # the identity of the frozen base a PEFT run's checkpoints leave out
MODEL = "model.json"  # the weight files a run started from (models read from disk)


class RunDirInUse(ConfigError):
    """Another live process is writing the run directory."""


@contextlib.contextmanager
def locked(run_dir: Path, *, enabled: bool = True) -> Iterator[None]:
    """Hold an exclusive lock on `run_dir` for the block, or fail at once naming its holder.

    `flock` dies with its process, so a killed run never leaves a stale lock behind.
    """
    if not enabled:
        yield
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "holder unknown"
            raise RunDirInUse(f"{run_dir} is in use by another run ({holder}); wait for it to "
                              "finish, or use another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def checkpointed_round(run_dir: Path) -> int | None:
    """The round of the latest complete checkpoint (orbax names a finished save by its step;
    a save in flight carries a suffix)."""
    ckpts = run_dir / "checkpoints"
    rounds = [int(p.name) for p in ckpts.iterdir() if p.name.isdigit()] if ckpts.is_dir() else []
    return max(rounds, default=None)


def read_json(path: Path) -> dict[str, Any] | None:
    """The object in `path`, None if there is no file; a damaged one is one ConfigError line."""
    if not path.exists():
        return None
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is damaged ({e}); delete it and rerun") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{path} is damaged (not a JSON object); delete it and rerun")
    return value


def check_resumable(cfg: RunConfig, run_dir: Path) -> dict[str, Any] | None:
    """Refuse a rerun that would continue another config's run or relabel this one's
    parameters with fewer rounds; return final.json if the run is finished at `cfg.rounds`."""
    check_run_files(run_dir)  # a damaged config.yaml / final.json: one line naming it
    final = read_json(run_dir / "final.json")
    done = max(checkpointed_round(run_dir) or 0, int(final.get("rounds", 0)) if final else 0)
    if not done and final is None:
        return None  # nothing trained here: a leftover config.yaml does not bind
    saved = run_dir / "config.yaml"
    if saved.exists():
        try:
            old = from_dict(load_yaml(saved)).to_dict()
        except ConfigError as e:
            raise ConfigError(f"{saved}: {e}") from None
        check_same_config(run_dir, "a run", old, cfg.to_dict(), RESUMABLE_FIELDS)
        if old["rounds"] != cfg.rounds and (what := privacy.fixed_by_rounds(cfg)):
            raise ResumeError(
                f"{run_dir} holds a run whose {what} was set for its {old['rounds']} rounds; "
                f"--rounds {cfg.rounds} would change it mid-run. Rerun with --rounds "
                f"{old['rounds']}, or use another --out.")
    check_model(run_dir, cfg.model, rounds_done=done, write=False)
    if done > cfg.rounds:
        raise ResumeError(
            f"{run_dir} holds a run trained for {done} rounds: --rounds {cfg.rounds} cannot undo "
            f"rounds (its parameters are the round-{done} model). Rerun with --rounds {done} or "
            "more, or use another --out.")
    return final if final is not None and final.get("rounds") == cfg.rounds else None


def check_data(run_dir: Path, fingerprint: dict[str, Any], *, rounds_done: int,
               write: bool) -> None:
    """Refuse to resume onto data other than the rounds so far were trained on (naming what
    differs); a fresh run records its fingerprint. `source` (a path) is for the record only:
    the same data read from another folder resumes."""
    detail = _recorded_diff(run_dir / DATA, fingerprint, rounds_done, write, ("source",))
    if detail:
        raise ResumeError(
            f"{run_dir} holds {rounds_done} round(s) trained on other data ({detail}): the data "
            "directory, data files or tokenizer changed since. Resume with the original data, "
            "or use another --out.")


def check_base(run_dir: Path, identity: dict[str, Any], *, rounds_done: int,
               write: bool) -> None:
    """Refuse to resume adapters onto another frozen base than they were trained on (its
    content hash changed; `model`, a name or path, is for the record); a fresh run records
    it."""
    detail = _recorded_diff(run_dir / BASE, identity, rounds_done, write, ("model",))
    if detail:
        raise ResumeError(
            f"{run_dir} holds {rounds_done} round(s) of adapters trained on another base model "
            f"({detail}): the weights of --model {identity['model']} changed since. Resume "
            "with the original base, or use another --out.")


def check_model(run_dir: Path, model: str, *, rounds_done: int, write: bool) -> None:
    """Refuse to continue, or to report as finished, a run started from other weights than
    `model`'s files hold now (a sweep would mix two models in one table); a fresh run records
    them. Random inits and weights not on disk are not checked."""
    identity = weights_identity(model)
    detail = identity and _recorded_diff(run_dir / MODEL, identity, rounds_done, write,
                                         ("model",))
    if detail:
        raise ResumeError(
            f"{run_dir} holds {rounds_done} round(s) trained from other weights of --model "
            f"{model} ({detail}): its weight files changed since. Restore them, or use another "
            "--out.")


def _recorded_diff(path: Path, fingerprint: dict[str, Any], rounds_done: int, write: bool,
                   ignore: tuple[str, ...]) -> str | None:
    """What differs from the fingerprint recorded at `path` ("key: old -> new; ..."), or
    None; a fresh run (or a directory made before that file existed) records it."""
    old = read_json(path) if rounds_done else None
    if old is None:
        if write:
            write_json(path, fingerprint)
        return None
    diff = [k for k, v in fingerprint.items() if k not in ignore and k in old and old[k] != v]
    return "; ".join(f"{k}: {_short(old[k])} -> {_short(fingerprint[k])}" for k in diff) or None


def _short(value: Any) -> str:
    return f"{value[:12]}…" if isinstance(value, str) and len(value) > 12 else repr(value)
