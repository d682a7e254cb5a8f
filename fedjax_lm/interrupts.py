"""Ctrl-C that never leaves a half-written file: code that must finish once started (a
checkpoint save, an atomic file write) runs in `critical_section()`, where a SIGINT is held and
raised as KeyboardInterrupt when the section exits.

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


def _in_finalizer(frame: Any) -> bool:
    code = frame.f_code
    return code.co_name == "__del__" or any(getattr(cb, "__code__", None) is code
                                            for cb in gc.callbacks)


def _handler(signum: int, frame: Any) -> None:
    global _pending
    if _depth:
        _pending = True
        return
    if frame is not None and _in_finalizer(frame):
        again = threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGINT))
        again.daemon = True
        again.start()
        return
    raise KeyboardInterrupt


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def ctrl_c_handler() -> Iterator[None]:
    """Install the handler for the block, unless SIGINT is ignored (a background job) or handled
    by an embedding program, or this is not the main thread (only it receives signals)."""
    if not _main_thread() or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    signal.signal(signal.SIGINT, _handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@contextlib.contextmanager
def critical_section() -> Iterator[None]:
    """Hold Ctrl-C until the block is done, then raise KeyboardInterrupt. Nests; a no-op off the
    main thread and where SIGINT is ignored or owned by an embedding program."""
    global _depth, _pending
    if not _main_thread():
        yield
        return
    outer = _depth == 0
    previous = signal.getsignal(signal.SIGINT)
    if outer and previous not in (_handler, signal.default_int_handler):
        yield
        return
    if outer:
        signal.signal(signal.SIGINT, _handler)
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if outer:
            signal.signal(signal.SIGINT, previous)
            if _pending:
                _pending = False
                raise KeyboardInterrupt
