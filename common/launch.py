"""Process-level glue shared by the entry scripts: error handling and job abort."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import threading
from dataclasses import dataclass
from typing import Callable, Iterator, MutableMapping, NoReturn, Optional

from common.errors import CRASH_EXIT_CODE, launcher_rank, report_and_exit

LAUNCHERS = ("horovodrun", "mpirun", "mpiexec", "srun", "prterun")
# How long a rank whose launcher is gone waits for the graceful stop (the ranks agree on
# a step, save, exit) before it ends itself: the job is gone within 30 s either way.
LAUNCHER_GONE_GRACE_SECONDS = 20.0


# Settings this project ships as defaults (each only if the user has not set it);
# README.md "Tuned defaults" has the measurements behind them.
TUNED_ENVIRONMENT = {
    # Open MPI busy-polls while a rank waits (Horovod's background thread, a
    # blocking receive), taking a core from the ranks' compute when the node's
    # cores are all in use: yielding made 2-rank Horovod data mode 1.4x faster
    # here (PyTorch 2.9k -> 4.0k img/s, TF 4.0k -> 5.7k), ahead of DDP.
    "OMPI_MCA_mpi_yield_when_idle": "1",
}


def apply_tuned_defaults(environment: MutableMapping[str, str] = os.environ) -> None:
    """Before MPI starts in this process: our defaults for what the user left unset."""
    for name, value in TUNED_ENVIRONMENT.items():
        environment.setdefault(name, value)


def launcher_world_size() -> int:
    for name in ("HOROVOD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "PMI_SIZE", "SLURM_NTASKS"):
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 1


def launcher_local_size() -> int:
    """How many ranks of this job share this node, as the launcher reports it."""
    for name in ("HOROVOD_LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "SLURM_NTASKS_PER_NODE"):
        value = os.environ.get(name, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1


@dataclass(frozen=True)
class CpuShare:
    """What a rank may compute on, as the system says it (read_cpu_share)."""
    cpuset: int                      # CPUs of its cgroup's cpuset (the node's, without one)
    affinity: int                    # CPUs this process may run on
    quota: Optional[float]           # the cgroup's CPU quota (cpu.max), in CPUs; None: none
    slurm_cpus_per_task: Optional[int]
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


def parse_cpu_max(text: str) -> Optional[float]:
    """cgroup v2's cpu.max ('200000 100000': 2 CPUs; 'max 100000': no quota)."""
    quota, _, period = text.strip().partition(" ")
    return None if quota == "max" else int(quota) / int(period or 100000)


def _cgroup_file(v2_name: str, v1_controller: str, v1_name: str) -> Optional[str]:
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


def read_cpu_share(local_ranks: Optional[int] = None) -> CpuShare:
    node = os.cpu_count() or 1
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        affinity = node
    cpuset_text = _cgroup_file("cpuset.cpus.effective", "cpuset", "cpuset.effective_cpus")
    quota_text = _cgroup_file("cpu.max", "cpu", "cpu.cfs_quota_us")
    quota = None
    with contextlib.suppress(ValueError):
        if quota_text and " " in quota_text.strip():
            quota = parse_cpu_max(quota_text)
        elif quota_text and int(quota_text) > 0:  # v1: microseconds per (usually) 100 ms period
            period = _cgroup_file("cpu.max", "cpu", "cpu.cfs_period_us") or "100000"
            quota = int(quota_text) / int(period)
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "")
    return CpuShare(cpuset=parse_cpu_list(cpuset_text) if cpuset_text and cpuset_text.strip() else node,
                    affinity=affinity, quota=quota, slurm_cpus_per_task=int(slurm) if slurm.isdigit() else None,
                    local_ranks=launcher_local_size() if local_ranks is None else local_ranks)


def cpus_per_rank(local_ranks: Optional[int] = None) -> int:
    """Compute threads (and decoder processes) for this rank: CpuShare.threads."""
    return read_cpu_share(local_ranks).threads()[0]


def rank_ranges(ranks: list) -> str:
    """Sorted ranks written compactly: [0, 1, 2, 5] -> '0-2,5'."""
    ranks, parts = sorted(ranks), []
    start = previous = ranks[0]
    for rank in [*ranks[1:], None]:
        if rank is not None and rank == previous + 1:
            previous = rank
            continue
        parts.append(f"{start}-{previous}" if previous > start else f"{start}")
        if rank is not None:
            start = previous = rank
    return ",".join(parts)


def host_placement(hostnames: list) -> str:
    """Where the ranks run, from every rank's hostname in rank order:
    'hosts: node1 ranks 0-1, node2 ranks 2-3' (hosts in the order of their first rank)."""
    ranks_of: dict = {}
    for rank, host in enumerate(hostnames):
        ranks_of.setdefault(host, []).append(rank)
    return "hosts: " + ", ".join(f"{host} rank{'s' if len(ranks) > 1 else ''} {rank_ranges(ranks)}"
                                 for host, ranks in ranks_of.items())


@dataclass(frozen=True)
class Process:
    pid: int
    started: int                     # clock ticks after boot: a PID reused later has another
    words: tuple                     # its command line

    def describe(self, width: int = 40) -> str:
        """'pid 123: horovodrun -np 2 ...' (a launcher by its own name, not its interpreter's)."""
        words = launcher_words(list(self.words)) or [os.path.basename(word) for word in self.words[:1]] + \
            list(self.words[1:])
        shown = " ".join(words)
        return f"pid {self.pid}: {shown[:width] + ' ...' if len(shown) > width else shown}"

    def alive(self) -> bool:
        seen = _read_process(self.pid)
        return seen is not None and seen[0].started == self.started


def _read_process(pid: int) -> Optional[tuple]:
    """(Process, parent PID) from /proc, or None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            fields = handle.read().rsplit(b")", 1)[1].split()
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            words = tuple(word.decode(errors="replace") for word in handle.read().split(b"\0") if word)
    except (OSError, IndexError):
        return None
    if fields[0] == b"Z":  # a zombie has ended; only its parent has not looked yet
        return None
    return Process(pid, int(fields[19]), words), int(fields[1])


def ancestors(pid: Optional[int] = None) -> list:
    """This process's ancestors, its parent first, up to (not including) PID 1."""
    chain, seen = [], _read_process(os.getppid() if pid is None else pid)
    while seen is not None and seen[0].pid > 1:
        chain.append(seen[0])
        seen = _read_process(seen[1])
    return chain


def launcher_words(words: list) -> Optional[list]:
    """``words`` from its launcher on ('python horovodrun ...' -> 'horovodrun ...'),
    without the program it launches (what follows the first python)."""
    for start, word in enumerate(words[:2]):
        if os.path.basename(word) in LAUNCHERS:
            launched = words[start + 1:]
            for end, argument in enumerate(launched):
                if os.path.basename(argument).startswith("python"):
                    launched = launched[:end]
                    break
            return [os.path.basename(word), *launched]
    return None


def launcher_chain(chain: list) -> list:
    """The ancestors a rank's job lives by: from its parent up to the outermost launcher,
    with the `sh -c "mpirun ..."` that horovodrun turns itself into (killing "horovodrun"
    kills that shell and leaves mpirun and the ranks running); just the parent when no
    launcher is among them (a remote host's orted, Slurm's slurmstepd)."""
    outermost = max((index for index, process in enumerate(chain) if launcher_words(list(process.words))),
                    default=None)
    if outermost is None:
        return chain[:1]
    above = chain[outermost + 1] if outermost + 1 < len(chain) else None
    if above and os.path.basename(above.words[0]) in ("sh", "bash", "dash") and above.words[1:2] == ("-c",) \
            and launcher_words(above.words[2].split()[:1]):
        outermost += 1
    return chain[:outermost + 1]


class LauncherWatch:
    """A daemon thread that notices at once when a process this rank's job lives by ends
    (the launcher killed, by any signal, SIGKILL included: a pidfd becomes readable). It
    says so on stderr, asks for the graceful stop (the ranks agree on a step, save, exit
    0) and, if this rank has not ended ``grace`` seconds later (the others gone, MPI's
    runtime with them), ends it. Open MPI's ranks end themselves soon after mpirun does,
    so the line comes first: the save is what the rest of that time allows."""

    def __init__(self, watched: list, request_stop: Callable[[str], None],
                 grace: float = LAUNCHER_GONE_GRACE_SECONDS, period: float = 1.0):
        self.watched, self.request_stop, self.grace, self.period = watched, request_stop, grace, period
        self.cause: Optional[str] = None
        self._ended = threading.Event()
        self._wake_read, self._wake_write = os.pipe()
        if watched:
            threading.Thread(target=self._watch, name="launcher-watch", daemon=True).start()

    def _watch(self) -> None:
        gone = self._wait_for_an_end()
        if gone is None:
            return
        global launcher_gone
        self.cause = launcher_gone = f"the end of its launcher ({gone.describe()})"
        final_word(f"rank {launcher_rank()}: {self.cause}: stopping, saving first if the other ranks can")
        self.request_stop(self.cause)
        if not self._ended.wait(self.grace):
            final_word(f"rank {launcher_rank()}: the job did not stop within {self.grace:.0f} s; ending this rank")
            os._exit(1)

    def _wait_for_an_end(self) -> Optional[Process]:
        """The first watched process to end, or None once close() is called."""
        handles = []
        for process in self.watched:
            with contextlib.suppress(OSError):  # no pidfd (Linux before 5.3): polled instead
                handles.append(os.pidfd_open(process.pid))
        poller = select.poll()
        for handle in (*handles, self._wake_read):
            poller.register(handle, select.POLLIN)
        timeout = None if len(handles) == len(self.watched) else self.period * 1000
        try:
            while not self._ended.is_set():
                gone = next((process for process in self.watched if not process.alive()), None)
                if gone is not None:
                    return gone
                poller.poll(timeout)
            return None
        finally:
            for handle in handles:
                os.close(handle)

    def close(self) -> None:
        self._ended.set()
        with contextlib.suppress(OSError):
            os.write(self._wake_write, b"x")


launcher_gone: Optional[str] = None  # set once a LauncherWatch has seen its launcher end


def _runtime_alive() -> bool:
    """Whether the process that started this rank (mpirun, orted, slurmstepd) still runs."""
    return os.getppid() != 1 and _read_process(os.getppid()) is not None


def watch_launcher(request_stop: Callable[[str], None]) -> LauncherWatch:
    """Start watching when a launcher started this process (alone, a rank has none to lose:
    `nohup python main.py &` must outlive its shell)."""
    launched = launcher_world_size() > 1 or "HOROVOD_RANK" in os.environ
    return LauncherWatch(launcher_chain(ancestors()) if launched else [], request_stop)


class ContactDeadline:
    """Ends this rank with one clear line (exit 2) unless ``reached()`` is called within
    ``seconds``: the ranks of a job whose hosts cannot reach each other (the wrong network
    interface, a firewall) otherwise wait in MPI or Gloo forever, or spin. Armed once the
    rank has its data, disarmed by the first collective every rank takes part in."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        launched = launcher_world_size() > 1
        self._timer = threading.Timer(seconds, self._expire) if launched and seconds > 0 else None
        if self._timer:
            self._timer.daemon = True
            self._timer.start()

    def reached(self) -> None:
        if self._timer:
            self._timer.cancel()

    def _expire(self) -> None:
        import socket

        final_word(f"error: rank {launcher_rank()} on {socket.gethostname()}: the job's ranks did not reach "
                   f"each other within {self.seconds:g} s of start-up. Across hosts this is usually the network "
                   "interface: name the one that connects the hosts (horovodrun --network-interface IFACE; "
                   "mpirun --mca btl_tcp_if_include IFACE --mca oob_tcp_if_include IFACE; Gloo: "
                   "HOROVOD_GLOO_IFACE=IFACE; NCCL: NCCL_SOCKET_IFNAME=IFACE), or allow longer with "
                   "--connect-timeout")
        os._exit(2)


def final_word(line: str) -> None:
    """A last line on stderr, even when the launcher that read it is gone (a broken pipe)."""
    try:
        os.write(2, (line + "\n").encode())
    except OSError:
        pass


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
        if launcher_gone:  # no launcher to abort through, perhaps no pipe to print to
            final_word(f"rank {launcher_rank()}: stopped by {launcher_gone}: {type(error).__name__}: {error}")
            os._exit(CRASH_EXIT_CODE)
        report_and_exit(error, abort_job)
    if launcher_gone and not _runtime_alive():  # stopped and saved; MPI's finalize would wait for it
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
