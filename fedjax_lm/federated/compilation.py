"""Count XLA compilations, to prove that rounds do not recompile."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import jax

_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class CompileCounter:
    """Number of XLA backend compilations seen while the counter was active."""

    def __init__(self) -> None:
        self.count = 0

    def _listener(self, event: str, duration: float, **kwargs) -> None:
        if event == _COMPILE_EVENT:
            self.count += 1


@contextlib.contextmanager
def count_compilations() -> Iterator[CompileCounter]:
    """`with count_compilations() as c: ...; c.count` — every jit/pmap compile inside."""
    counter = CompileCounter()
    jax.monitoring.register_event_duration_secs_listener(counter._listener)
    try:
        yield counter
    finally:
        jax.monitoring.unregister_event_duration_listener(counter._listener)
