"""User-facing errors: one clear line, a documented exit code, no traceback."""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from typing import NoReturn

USAGE_EXIT_CODE = 2
CRASH_EXIT_CODE = 1


class RunStopped(Exception):
    """The run cannot go on for a reason every rank agreed on (e.g. a non-finite
    loss): one line on rank 0, exit code ``exit_code``, no traceback."""

    exit_code = 3


class UsageError(Exception):
    """Bad input the user can fix: wrong flags, missing or corrupt data, bad checkpoints.

    The message names the problem and the fix. Code raising it in a multi-rank
    run must make sure every rank raises it (e.g. rank 0 broadcasts the outcome
    of a check only it can do), so the job ends together instead of hanging.
    """

    exit_code = USAGE_EXIT_CODE


class RankUsageError(UsageError):
    """Bad input that only this rank has seen (e.g. the image file it was about to read):
    it prints its own line, whatever its rank, and brings the whole job down with exit
    code 2, since the other ranks would wait for it forever."""


def launcher_rank() -> int:
    """This process's global rank as the launcher reports it, before any init."""
    for name in ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "SLURM_PROCID"):
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 0


def report_and_exit(error: BaseException, abort_job: Callable[[int], None] | None = None) -> NoReturn:
    """Print ``error`` and end this process; never returns.

    A UsageError is raised by every rank alike, so only rank 0 prints its one
    line and all exit with code 2. Anything else is a crash on this rank: print
    the traceback with the rank and call ``abort_job`` (MPI_Abort) so ranks
    blocked waiting on this one are released promptly.
    """
    rank = launcher_rank()
    if isinstance(error, RankUsageError):
        print(f"error: {error}", file=sys.stderr, flush=True)
        if abort_job is not None:
            abort_job(error.exit_code)
        sys.exit(error.exit_code)
    if isinstance(error, (UsageError, RunStopped)):
        if rank == 0:
            print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(error.exit_code)
    if isinstance(error, KeyboardInterrupt):
        print(f"rank {rank}: interrupted", file=sys.stderr, flush=True)
    else:
        print(f"rank {rank}: crashed:", file=sys.stderr)
        traceback.print_exception(error, file=sys.stderr)
        sys.stderr.flush()
    if abort_job is not None:
        abort_job(CRASH_EXIT_CODE)
    sys.exit(CRASH_EXIT_CODE)


def final_word(line: str) -> None:
    """A last line on stderr, even when the launcher that read it is gone (a broken pipe)."""
    try:
        os.write(2, (line + "\n").encode())
    except OSError:
        pass
