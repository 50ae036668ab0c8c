"""How many CPUs a rank may compute on: cgroups (v1 and v2), its affinity, Slurm's
--cpus-per-task, shared among the job's ranks on the node."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

from common.launch.environment import launcher_local_size


@dataclass(frozen=True)
class CpuShare:
    """What a rank may compute on, as the system says it (read_cpu_share)."""
    cpuset: int                      # CPUs of its cgroup's cpuset (the node's, without one)
    affinity: int                    # CPUs this process may run on
    quota: float | None           # the cgroup's CPU quota (cpu.max), in CPUs; None: none
    slurm_cpus_per_task: int | None
    local_ranks: int                 # ranks of the job on this node

    def threads(self) -> tuple:
        """(compute threads for this rank, why): Slurm's --cpus-per-task when set; the
        affinity when the launcher bound the rank to part of the cpuset; else the
        affinity shared among the local ranks; never more than their share of a quota."""
        local = max(1, self.local_ranks)
        if self.slurm_cpus_per_task:
            own, why = self.slurm_cpus_per_task, f"SLURM_CPUS_PER_TASK={self.slurm_cpus_per_task}"
        elif self.affinity < self.cpuset:
            own, why = self.affinity, f"bound to {self.affinity} of {self.cpuset} CPUs"
        else:
            own, why = self.affinity // local, f"{self.affinity} CPUs / {local} rank{'s' * (local > 1)} here"
        if self.quota is not None and self.quota / local < own:
            own, why = int(self.quota / local), f"a CPU quota of {self.quota:g} / {local} rank{'s' * (local > 1)} here"
        return max(1, own), why


def parse_cpu_list(text: str) -> int:
    """How many CPUs a list like '0-3,8,10-11' names."""
    count = 0
    for part in filter(None, text.strip().split(",")):
        first, _, last = part.partition("-")
        count += int(last or first) - int(first) + 1
    return count


def parse_cpu_max(text: str) -> float | None:
    """cgroup v2's cpu.max ('200000 100000': 2 CPUs; 'max 100000': no quota)."""
    quota, _, period = text.strip().partition(" ")
    return None if quota == "max" else int(quota) / int(period or 100000)


def cgroup_file(v2_name: str, v1_controller: str, v1_name: str) -> str | None:
    """A file of this process's cgroup (v2's unified tree, or v1's controller), its text."""
    try:
        with open("/proc/self/cgroup") as handle:
            entries = [line.rstrip("\n").split(":", 2) for line in handle if line.count(":") >= 2]
    except OSError:
        return None
    for _, controllers, path in entries:
        if controllers == "":
            candidate = f"/sys/fs/cgroup{path.rstrip('/')}/{v2_name}"
        elif v1_controller in controllers.split(","):
            candidate = f"/sys/fs/cgroup/{controllers}{path.rstrip('/')}/{v1_name}"
        else:
            continue
        with contextlib.suppress(OSError):
            with open(candidate) as handle:
                return handle.read()
    return None


def read_cpu_share(local_ranks: int | None = None) -> CpuShare:
    node = os.cpu_count() or 1
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        affinity = node
    cpuset_text = cgroup_file("cpuset.cpus.effective", "cpuset", "cpuset.effective_cpus")
    quota_text = cgroup_file("cpu.max", "cpu", "cpu.cfs_quota_us")
    quota = None
    with contextlib.suppress(ValueError):
        if quota_text and " " in quota_text.strip():
            quota = parse_cpu_max(quota_text)
        elif quota_text and int(quota_text) > 0:  # v1: microseconds per (usually) 100 ms period
            period = cgroup_file("cpu.max", "cpu", "cpu.cfs_period_us") or "100000"
            quota = int(quota_text) / int(period)
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "")
    return CpuShare(cpuset=parse_cpu_list(cpuset_text) if cpuset_text and cpuset_text.strip() else node,
                    affinity=affinity, quota=quota, slurm_cpus_per_task=int(slurm) if slurm.isdigit() else None,
                    local_ranks=launcher_local_size() if local_ranks is None else local_ranks)


def cpus_per_rank(local_ranks: int | None = None) -> int:
    """Compute threads (and decoder processes) for this rank: CpuShare.threads."""
    return read_cpu_share(local_ranks).threads()[0]
