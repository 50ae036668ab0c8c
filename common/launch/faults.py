"""Failures on purpose, for the tests only (off unless CNN_PARALLEL_TEST_FAILURE is set)."""

from __future__ import annotations

import os
import signal
import sys
import time

TEST_FAILURE_VARIABLE = "CNN_PARALLEL_TEST_FAILURE"
FAILURE_MARK = "injected failure at unix time"


class FaultInjection:
    """Test-only failure injection: CNN_PARALLEL_TEST_FAILURE=WHO:POINT:HOW (WHO a rank, or
    the host name Horovod elastic gave the worker; POINT a global step number or 'save';
    HOW 'raise' or 'kill') makes that process fail at that point, so tests can prove one
    failing rank brings the whole job down promptly (or, elastic, that the others go
    on). Just before it fails, the process prints ``FAILURE_MARK`` and the wall-clock time,
    so a test can time the job's end from the failure rather than from its start-up.
    Unset, ``at`` does nothing."""

    def __init__(self, setting: str | None):
        self.who: str | None = None
        self.point: str | None = None
        self.how: str | None = None
        if setting:
            self.who, self.point, self.how = setting.split(":")

    @classmethod
    def from_environment(cls) -> FaultInjection:
        return cls(os.environ.get(TEST_FAILURE_VARIABLE))

    def at(self, rank: int, point: int | str) -> None:
        if self.who is None:
            return
        me = str(rank) if self.who.isdigit() else os.environ.get("HOROVOD_HOSTNAME")
        if self.who == me and self.point == str(point):
            sys.stderr.write(f"{FAILURE_MARK} {time.time():.3f}\n")
            sys.stderr.flush()
            if self.how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError(f"injected failure on rank {rank} at {point} ({TEST_FAILURE_VARIABLE})")
