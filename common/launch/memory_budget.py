"""How much memory a rank may hold (--mode auto's default --memory-per-rank): on a GPU,
its card's, shared among the ranks dealt to that card; else the node's, or its cgroup's
limit (v1 and v2) where lower, shared among the job's ranks on the node."""

from __future__ import annotations

import contextlib
import os

from common.core.errors import UsageError
from common.launch.cpu_budget import cgroup_file
from common.launch.environment import launcher_local_size

UNITS = {"": 1, "k": 2 ** 10, "m": 2 ** 20, "g": 2 ** 30, "t": 2 ** 40}


def parse_size(text: str) -> int:
    """Bytes of a size such as 512M, 2G or 1.5GiB (binary units; a bare number is bytes)."""
    cleaned = text.strip().lower().removesuffix("ib").removesuffix("b")
    number, unit = (cleaned[:-1], cleaned[-1]) if cleaned[-1:] in UNITS else (cleaned, "")
    try:
        value = float(number) * UNITS[unit]
    except ValueError:
        value = -1.0
    if not value > 0:
        raise UsageError(f"--memory-per-rank {text!r} is not a size; give one such as 512M, 8G or 1.5GiB")
    return int(value)


def node_memory_bytes() -> int:
    """The node's memory, or its cgroup's limit where that is lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit = cgroup_file("memory.max", "memory", "memory.limit_in_bytes")
    with contextlib.suppress(ValueError):
        if limit and limit.strip() != "max":
            total = min(total, int(limit))
    return total


def memory_per_rank(local_ranks: int | None = None, device_bytes: int | None = None, devices: int = 1) -> int:
    """A rank's share: of its device's ``device_bytes`` when given, among the local ranks
    dealt round-robin to ``devices`` cards (the most any card gets); else of the node's
    memory (or its cgroup's limit) among the job's ranks on it."""
    ranks = max(1, launcher_local_size() if local_ranks is None else local_ranks)
    if device_bytes:
        return device_bytes // -(-ranks // max(1, devices))
    return node_memory_bytes() // ranks
