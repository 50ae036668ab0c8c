"""Failures on purpose, for the tests only (off unless CNN_PARALLEL_TEST_FAILURE is set)."""

from __future__ import annotations

import os
import signal

TEST_FAILURE_VARIABLE = "CNN_PARALLEL_TEST_FAILURE"


def _failure_injection():
    """Test-only failure injection, read once at start-up: CNN_PARALLEL_TEST_FAILURE=WHO:POINT:HOW
    (WHO a rank, or the host name Horovod elastic gave the worker; POINT a global step
    number or 'save'; HOW 'raise' or 'kill') makes that process fail at ``point``, so
    tests can prove one failing rank brings the whole job down promptly (or, elastic,
    that the others go on). Unset, the hook is a function that does nothing."""
    setting = os.environ.get(TEST_FAILURE_VARIABLE)
    if not setting:
        return lambda rank, point: None
    who, want_point, how = setting.split(":")

    def fail_if_chosen(rank, point):
        me = str(rank) if who.isdigit() else os.environ.get("HOROVOD_HOSTNAME")
        if who == me and want_point == str(point):
            if how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError(f"injected failure on rank {rank} at {point} ({TEST_FAILURE_VARIABLE})")
    return fail_if_chosen


injected_failure = _failure_injection()
