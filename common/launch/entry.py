"""An entry script's outer frame: every failure becomes one clear report and an exit
code, and a failing rank brings the whole job down (MPI_Abort) instead of hanging it."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from typing import NoReturn

from common.core.errors import CRASH_EXIT_CODE, final_word, launcher_rank, report_and_exit
from common.launch import supervision
from common.launch.environment import launcher_world_size


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
    """Run ``main(argv)``; turn every failure into one clear report and an exit code."""
    try:
        main(argv)
    except SystemExit:
        raise
    except BaseException as error:  # noqa: BLE001 - the one place every failure is reported
        if supervision.launcher_gone:  # no launcher to abort through, perhaps no pipe to print to
            final_word(f"rank {launcher_rank()}: stopped by {supervision.launcher_gone}: {type(error).__name__}: {error}")
            os._exit(CRASH_EXIT_CODE)
        report_and_exit(error, abort_job)
    if supervision.launcher_gone and not supervision.runtime_alive():  # stopped and saved; MPI's finalize would wait for it
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
