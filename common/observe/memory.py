"""How much memory a rank holds: its process's resident memory on a CPU, the framework's
device allocator on a GPU (the framework folders supply that meter)."""

from __future__ import annotations

import os
import resource
import sys
from typing import Protocol


class MemoryMeter(Protocol):
    """A rank's memory, read where it computes."""

    kind: str       # what is counted, for the start-up line: "resident" or the device's allocator
    baseline: int   # bytes held when the meter was made: before the rank built its model
    device_bytes: int | None   # what the rank's device holds; None where the host's memory is the limit
    devices: int    # the node's devices of that kind, among which its ranks are dealt
    on_accelerator: bool  # the rank computes on a GPU (its host's CPUs are free for communication)

    def peak(self) -> int:
        """The most bytes held so far."""


def resident_bytes() -> int:
    """The process's resident memory now (Linux: /proc/self/statm; elsewhere its peak)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return peak_resident_bytes()


def peak_resident_bytes() -> int:
    """The process's resident high-water mark (getrusage: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


class ResidentMemory:
    kind = "resident"
    device_bytes = None
    devices = 1
    on_accelerator = False

    def __init__(self):
        self.baseline = resident_bytes()

    def peak(self) -> int:
        return peak_resident_bytes()

