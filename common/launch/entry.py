"""An entry script's outer frame: every failure becomes one clear report and an exit
code, and a failing rank brings the whole job down (MPI_Abort) instead of hanging it."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from typing import NoReturn

from common.core.errors import CRASH_EXIT_CODE, final_word, launcher_rank, report_and_exit
from common.launch.environment import launcher_world_size
from common.launch.supervision import Supervision, runtime_alive


def abort_job(exit_code: int) -> NoReturn:
    """Bring every rank of the job down now (MPI_Abort), so none hangs on this one."""
    if launcher_world_size() > 1:
        try:
            from mpi4py import MPI
            if MPI.Is_initialized() and not MPI.Is_finalized():
                MPI.COMM_WORLD.Abort(exit_code)
        except ImportError:
            pass
    os._exit(exit_code)


def run_entry(main: Callable[[list[str] | None], object], argv: list[str] | None = None) -> None:
    """Run a command's ``main(argv)``; turn every failure into one clear report and an exit code."""
    _reported(lambda: main(argv), Supervision())


def run_training(main: Callable[[list[str] | None, Supervision], object], argv: list[str] | None = None) -> None:
    """Run an entry script's ``main(argv, supervision)`` as run_entry does; when the watch
    the trainer started saw the launcher end, end the process without MPI's help."""
    supervision = Supervision()
    _reported(lambda: main(argv, supervision), supervision)


def _reported(call: Callable[[], object], supervision: Supervision) -> None:
    try:
        call()
    except SystemExit:
        raise
    except BaseException as error:  # noqa: BLE001 - the one place every failure is reported
        gone = supervision.launcher_gone
        if gone:  # no launcher to abort through, perhaps no pipe to print to
            final_word(f"rank {launcher_rank()}: stopped by {gone}: {type(error).__name__}: {error}")
            os._exit(CRASH_EXIT_CODE)
        report_and_exit(error, abort_job)
    if supervision.launcher_gone and not runtime_alive():  # stopped and saved; MPI's finalize would wait for it
        with contextlib.suppress(OSError):
            sys.stdout.flush()
        os._exit(0)
    sys.stdout.flush()


@contextlib.contextmanager
def quiet_stderr(enabled: bool = True) -> Iterator[None]:
    """Silence file descriptor 2 (C++ libraries' logging) for the duration."""
    if not enabled:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
