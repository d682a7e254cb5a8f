"""Orbax checkpoints of everything a round depends on: server state, carried client
states and the round index. Data order and client sampling are pure functions of
(seed, round), so restoring these makes a resumed run bitwise identical.

Every call into orbax that writes or deletes runs in a critical section: Ctrl-C waits for it
(orbax would log a traceback and could leave a half-saved step), then interrupts."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from fedjax_lm.federated import ClientStateStore, ServerState
from fedjax_lm.federated.trainable import trainable_part, with_trainable
from fedjax_lm.interrupts import critical_section


def saved_state(mask: Any, state: ServerState) -> ServerState:
    """What a checkpoint holds: under PEFT (`mask`) the trainable leaves only; the frozen base
    is the model's own, checked by hash on resume (`rundir.check_base`)."""
    return state.replace(params=trainable_part(mask, state.params))


def _to_saveable(state: ServerState, client_states: Any) -> dict:
    # Typed PRNG keys are stored as their raw key data.
    return {
        "server": state.replace(rng=jax.random.key_data(state.rng)),
        "client_states": client_states if client_states is not None else {},
    }


def _what_failed(step_dir: Path, error: Exception) -> str:
    """The error's kind and the file inside `step_dir` (or else the array) it names, if any:
    tensorstore quotes a file it cannot decode and spells out the array it could not read;
    orbax's own JSON errors name neither."""
    message = str(error)
    for quoted in reversed(re.findall(r'"(/[^"]+)"', message)):
        path = Path(quoted)
        if path.is_file() and path.is_relative_to(step_dir):
            return f"{type(error).__name__} in {path.relative_to(step_dir)}"
    if array := re.search(r"'path': '([\w.]+)/'", message):
        return f"{type(error).__name__} reading {array.group(1)}"
    return type(error).__name__


class Checkpointer:
    def __init__(self, directory: Path, *, max_to_keep: int = 2):
        self._manager = ocp.CheckpointManager(
            Path(directory).absolute(),
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        )

    def latest_round(self) -> int | None:
        return self._manager.latest_step()

    def save(self, round_index: int, state: ServerState, client_states: Any = None) -> None:
        with critical_section():
            self._manager.save(
                round_index, args=ocp.args.StandardSave(_to_saveable(state, client_states))
            )

    def restore(self, template_state: ServerState, template_clients: Any = None):
        """Restore the newest checkpoint that reads back into the structure (and shardings) of
        the templates: `(round, server state, client states)`. A damaged one (truncated,
        garbled metadata) is named in a one-line warning and deleted, and the one before it is
        tried; with none left the run restarts at round 0 from the templates."""
        target = jax.tree.map(
            ocp.utils.to_shape_dtype_struct, _to_saveable(template_state, template_clients)
        )
        for step in sorted(self._manager.all_steps(), reverse=True):
            try:
                restored = self._manager.restore(step, args=ocp.args.StandardRestore(target))
            except Exception as e:  # orbax raises many kinds for a damaged file
                where = Path(self._manager.directory) / str(step)
                print(f"warning: checkpoint {where} is damaged ({_what_failed(where, e)}); "
                      "deleted it, resuming from an earlier one", file=sys.stderr)
                with critical_section():
                    self._manager.delete(step)
                continue
            server = restored["server"]
            server = server.replace(rng=jax.random.wrap_key_data(server.rng))
            clients = restored["client_states"] if template_clients is not None else None
            return step, server, clients
        return 0, template_state, template_clients

    def restore_trainable(self, mask: Any, state: ServerState, store: Any):
        """`restore` of a run saved with `saved_state(mask, ...)`: (round, server state,
        client-state store), the frozen leaves taken from `state` (the run's own base)."""
        start, saved, states = self.restore(saved_state(mask, state), store and store.states)
        state = saved.replace(params=with_trainable(mask, state.params, saved.params))
        return start, state, store and ClientStateStore(states)

    def wait(self) -> None:
        """Block until an asynchronous save has committed."""
        with critical_section():
            self._manager.wait_until_finished()

    def close(self) -> None:
        with critical_section():
            self._manager.close()
