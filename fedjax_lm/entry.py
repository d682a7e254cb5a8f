"""How a command ends: what a user can fix is one line and exit status 2, Ctrl-C one line and 130.

`fedjax-lm` and the modules that are also run as `python -m ...` (the paper 2 and 3
experiments) share this contract, so it sits below all of them: a module's own entry point
calls `run_command` instead of importing the CLI above it. Imports are lazy, inside the
handler, so that even a Ctrl-C during them is one line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import typing
from collections.abc import Callable
from dataclasses import dataclass


class OneLineParser(argparse.ArgumentParser):
    """A usage error is one line naming the fix (argparse prints the whole usage first)."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def user_errors() -> tuple[type[BaseException], ...]:
    """What a user can fix, printed as one line: bad config, data, model, files, a stopped run."""
    import yaml

    from fedjax_lm.data import DataError
    from fedjax_lm.grid import ConfigError
    from fedjax_lm.io import DamagedFileError
    from fedjax_lm.models import ModelLoadError
    from fedjax_lm.runner.train import TrainingError

    return (ConfigError, DataError, ModelLoadError, TrainingError, DamagedFileError, OSError,
            yaml.YAMLError, json.JSONDecodeError)


def one_line(e: BaseException) -> str:
    """The error as one line; an OSError says what to check rather than its errno."""
    if isinstance(e, OSError) and e.strerror:  # "[Errno 28] ..." says less than this
        where = f"{e.filename}: " if e.filename else ""
        return f"{where}{e.strerror}; check the path, its permissions and free space"
    return " ".join(str(e).split()) or type(e).__name__


@dataclass
class Invocation:
    """What the closing line names; a command refines it once its flags are parsed."""

    prog: str
    resumable: bool = False  # an interrupt then says that rerunning the command resumes


def run_command(body: Callable[[Invocation], int], prog: str, *,
                owns_process: bool = False) -> int:
    """Run `body` (parsing included) and return its exit status under the contract above.

    `owns_process`: the process ends here on an interrupt (an installed script or `python
    -m`), since XLA's native teardown at interpreter exit can crash mid-computation (status
    -11, not 130); a caller that passes argv (a test) gets the status back instead.
    """
    from fedjax_lm.interrupts import ctrl_c_handler

    invocation = Invocation(prog)
    with ctrl_c_handler():  # checkpoint and file writes hold Ctrl-C until they are done
        code = _guarded(body, invocation)
    if code == 130 and owns_process:
        sys.stdout.flush()  # the run has closed its checkpoints and logs by now
        sys.stderr.flush()
        os._exit(130)
    return code


def module_main(prog: str, description: str,
                add_arguments: Callable[[argparse.ArgumentParser], None],
                run: Callable[[argparse.Namespace, list[str] | None], int],
                argv: list[str] | None = None) -> int:
    """A module's own `python -m` entry point: its flags parsed and run under this contract."""
    parser = OneLineParser(prog=prog, description=description)
    add_arguments(parser)
    return run_command(lambda _: run(parser.parse_args(argv), argv), prog,
                       owns_process=argv is None)


def _guarded(body: Callable[[Invocation], int], invocation: Invocation) -> int:
    try:
        return body(invocation)
    except KeyboardInterrupt as e:
        if not getattr(e, "reported", False):  # a sweep cell has said it already
            resume = "; rerun the same command to resume from the last checkpoint"
            print(f"{invocation.prog}: interrupted{resume if invocation.resumable else ''}",
                  file=sys.stderr)
        return 130
    except Exception as e:
        if not isinstance(e, user_errors()):
            raise
        if not getattr(e, "reported", False):  # a sweep cell has said it already
            print(f"{invocation.prog}: error: {one_line(e)}", file=sys.stderr)
        return 2
