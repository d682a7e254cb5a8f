"""Ctrl-C that never leaves a half-written file: code that must finish once started (a
checkpoint save, an atomic file write) runs in `critical_section()`, where a SIGINT is held and
raised as KeyboardInterrupt when the section exits.

SIGTERM (a scheduler's preemption, `kill`, a background job, which ignores SIGINT) is taken the
same way where `ctrl_c_handler()` installs the handler: a killed run stops at the next safe
point instead of dying mid-write, and `received()` says which signal it was.

Outside a section, `ctrl_c_handler()` (the CLI installs it for the process) raises at once,
except in a garbage-collector callback or a `__del__`, where Python would print "Exception
ignored", drop the interrupt and let the run go on: there it is delivered again a moment later.
Like io.py this sits at the top of the package and imports nothing from it.
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import threading
from collections.abc import Iterator
from typing import Any

_depth = 0  # nesting of critical sections on the main thread
_pending = False  # a SIGINT arrived inside a section
_received: int | None = None  # the last signal the handler took


def _in_finalizer(frame: Any) -> bool:
    code = frame.f_code
    return code.co_name == "__del__" or any(getattr(cb, "__code__", None) is code
                                            for cb in gc.callbacks)


def _handler(signum: int, frame: Any) -> None:
    global _pending, _received
    _received = signum
    if _depth:
        _pending = True
        return
    if frame is not None and _in_finalizer(frame):
        again = threading.Timer(0.05, os.kill, (os.getpid(), signum))
        again.daemon = True
        again.start()
        return
    raise KeyboardInterrupt


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def received() -> int | None:
    """The signal behind the latest interrupt (SIGINT or SIGTERM), None before any."""
    return _received


@contextlib.contextmanager
def ctrl_c_handler() -> Iterator[None]:
    """Install the handler for the block on SIGINT and SIGTERM where each has its default
    action (SIGINT is ignored in a background job; either may belong to an embedding program),
    unless this is not the main thread (only it receives signals)."""
    defaults = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}
    mine = [s for s, d in defaults.items() if _main_thread() and signal.getsignal(s) is d]
    for signum in mine:
        signal.signal(signum, _handler)
    try:
        yield
    finally:
        for signum in mine:
            signal.signal(signum, defaults[signum])


@contextlib.contextmanager
def critical_section() -> Iterator[None]:
    """Hold Ctrl-C (and, under `ctrl_c_handler`, SIGTERM) until the block is done, then raise
    KeyboardInterrupt. Nests; a no-op off the main thread and for a signal that is ignored or
    owned by an embedding program."""
    global _depth, _pending
    if not _main_thread():
        yield
        return
    outer = _depth == 0
    previous = signal.getsignal(signal.SIGINT)
    hold_sigint = outer and previous is signal.default_int_handler  # held even without the CLI
    if hold_sigint:
        signal.signal(signal.SIGINT, _handler)
    _depth += 1  # _handler, wherever it is installed (SIGINT, SIGTERM), holds the signal
    try:
        yield
    finally:
        _depth -= 1
        if hold_sigint:
            signal.signal(signal.SIGINT, previous)
        if outer and _pending:
            _pending = False
            raise KeyboardInterrupt
