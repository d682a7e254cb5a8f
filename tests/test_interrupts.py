"""Critical sections hold Ctrl-C (SIGINT) until they exit; outside one it interrupts at once."""

import contextlib
import os
import signal
import time

import pytest

from fedjax_lm.interrupts import critical_section, ctrl_c_handler


def _ctrl_c() -> None:
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.05)  # Python runs the handler at the next bytecode boundary


@pytest.mark.parametrize("installed", [False, True], ids=["default", "cli"])
def test_a_section_finishes_its_work_then_raises(installed: bool) -> None:
    done = []
    with (ctrl_c_handler() if installed else contextlib.nullcontext(),
          pytest.raises(KeyboardInterrupt), critical_section()):
        with critical_section():  # nested: held until the outermost exits
            _ctrl_c()
            done.append("inner")
        done.append("outer")
    assert done == ["inner", "outer"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


def test_without_a_pending_interrupt_a_section_is_transparent() -> None:
    with critical_section():
        value = 1
    assert value == 1
    with ctrl_c_handler(), pytest.raises(KeyboardInterrupt):
        _ctrl_c()  # outside a section: at once
        pytest.fail("not interrupted")
    with critical_section(), pytest.raises(ValueError):  # the block's own error passes through
        raise ValueError


def test_an_ignored_ctrl_c_stays_ignored() -> None:
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with critical_section():
            _ctrl_c()
    finally:
        signal.signal(signal.SIGINT, previous)


def test_sigterm_is_taken_like_ctrl_c_even_where_ctrl_c_is_ignored() -> None:
    """A background job ignores SIGINT; a scheduler stops it with SIGTERM: under the CLI's
    handler that is held in a section and raised after it, not a death mid-write."""
    from fedjax_lm import interrupts

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    done = []
    try:
        with ctrl_c_handler():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # stays ignored
            with pytest.raises(KeyboardInterrupt), critical_section():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)
                done.append("written")
            assert interrupts.received() == signal.SIGTERM
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored
    finally:
        signal.signal(signal.SIGINT, previous)
    assert done == ["written"]
