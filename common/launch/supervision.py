"""A rank watching what its job lives by: the launcher's processes (a rank notices at
once when they end, stops gracefully, saves), and the start-up deadline for ranks
that cannot reach each other."""

from __future__ import annotations

import contextlib
import os
import select
import threading
from collections.abc import Callable
from dataclasses import dataclass

from common.core.errors import final_word, launcher_rank
from common.launch.environment import launcher_world_size

LAUNCHERS = ("horovodrun", "mpirun", "mpiexec", "srun", "prterun")
# How long a rank whose launcher is gone waits for the graceful stop (the ranks agree on
# a step, save, exit) before it ends itself: the job is gone within 30 s either way.
LAUNCHER_GONE_GRACE_SECONDS = 20.0


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


def _read_process(pid: int) -> tuple | None:
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


def ancestors(pid: int | None = None) -> list:
    """This process's ancestors, its parent first, up to (not including) PID 1."""
    chain, seen = [], _read_process(os.getppid() if pid is None else pid)
    while seen is not None and seen[0].pid > 1:
        chain.append(seen[0])
        seen = _read_process(seen[1])
    return chain


def launcher_words(words: list) -> list | None:
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
        self.cause: str | None = None
        self._ended = threading.Event()
        self._wake_read, self._wake_write = os.pipe()
        if watched:
            threading.Thread(target=self._watch, name="launcher-watch", daemon=True).start()

    def _watch(self) -> None:
        gone = self._wait_for_an_end()
        if gone is None:
            return
        self.cause = f"the end of its launcher ({gone.describe()})"
        final_word(f"rank {launcher_rank()}: {self.cause}: stopping, saving first if the other ranks can")
        self.request_stop(self.cause)
        if not self._ended.wait(self.grace):
            final_word(f"rank {launcher_rank()}: the job did not stop within {self.grace:.0f} s; ending this rank")
            os._exit(1)

    def _wait_for_an_end(self) -> Process | None:
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


def runtime_alive() -> bool:
    """Whether the process that started this rank (mpirun, orted, slurmstepd) still runs."""
    return os.getppid() != 1 and _read_process(os.getppid()) is not None


def watch_launcher(request_stop: Callable[[str], None]) -> LauncherWatch:
    """Start watching when a launcher started this process (alone, a rank has none to lose:
    `nohup python main.py &` must outlive its shell)."""
    launched = launcher_world_size() > 1 or "HOROVOD_RANK" in os.environ
    return LauncherWatch(launcher_chain(ancestors()) if launched else [], request_stop)


class Supervision:
    """One rank's watch on what its job lives by, made by the entry (entry.run_training)
    and handed to the trainer, which starts it with its stop request; afterwards the
    entry reads whether the launcher ended, which decides how the process may end."""

    def __init__(self) -> None:
        self._watch: LauncherWatch | None = None

    def start(self, request_stop: Callable[[str], None]) -> LauncherWatch:
        self._watch = watch_launcher(request_stop)
        return self._watch

    @property
    def launcher_gone(self) -> str | None:
        """What ended, once the watch has seen its launcher end (set by the watch's thread)."""
        return self._watch.cause if self._watch else None


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
