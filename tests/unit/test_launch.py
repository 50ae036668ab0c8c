"""A rank's view of its launcher: which ancestors it lives by, and noticing their end."""

import os
import subprocess
import sys
import threading

from common import launch
from common.launch import Process


def process(pid, *words):
    return Process(pid, 1000 + pid, tuple(words))


def test_a_rank_watches_its_ancestors_up_to_the_outermost_launcher():
    rank_parent = process(30, "mpirun", "--tag-output", "-np", "2", "/v/bin/python", "main.py")
    shell = process(20, "/bin/sh", "-c", "mpirun --tag-output -np 2 python main.py")  # what horovodrun exec'd
    login = process(10, "bash")
    assert launch.launcher_chain([rank_parent, shell, login]) == [rank_parent, shell]
    assert launch.launcher_chain([rank_parent, login]) == [rank_parent]  # typed in a shell: not the shell
    elastic = [process(5, "/bin/sh", "-c", "env HOROVOD_RANK=0 python main.py"), process(4, "python", "-c", "spawn"),
               process(3, "python", "/v/bin/horovodrun", "-np", "2", "python", "main.py"), login]
    assert launch.launcher_chain(elastic) == elastic[:3]
    orted = process(40, "orted", "-mca", "ess", "env")  # a remote host: no launcher here, its daemon is enough
    assert launch.launcher_chain([orted, process(39, "sshd")]) == [orted]
    assert launch.launcher_chain([]) == []
    assert elastic[2].describe() == "pid 3: horovodrun -np 2"
    assert rank_parent.describe(width=12) == "pid 30: mpirun --tag ..."


def test_the_end_of_a_watched_process_is_noticed_at_once_and_a_process_reused_pid_is_not_it():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        watched = launch._read_process(child.pid)[0]
        assert watched.alive() and not Process(child.pid, watched.started + 1, watched.words).alive()
        causes, noticed = [], threading.Event()
        watch = launch.LauncherWatch([watched], lambda cause: (causes.append(cause), noticed.set()), grace=300)
        try:
            assert not noticed.wait(0.3)  # alive: nothing to say
            child.kill()
            assert noticed.wait(10), "the watch did not notice"
        finally:
            watch.close()  # before its grace ends the test process
        interpreter = os.path.basename(sys.executable)
        assert len(causes) == 1 and causes[0].startswith(f"the end of its launcher (pid {child.pid}: {interpreter} -c")
        assert not watched.alive()  # also as a zombie, not yet reaped
    finally:
        child.kill()
        child.wait()


def test_a_closed_watch_stops_quietly_and_a_rank_without_a_launcher_watches_nothing(monkeypatch):
    for name in ("HOROVOD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "PMI_SIZE", "SLURM_NTASKS", "HOROVOD_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert launch.watch_launcher(lambda cause: None).watched == []  # nohup python main.py & outlives its shell
    watch = launch.LauncherWatch([launch.ancestors()[0]], lambda cause: None)
    watch.close()
    assert watch.cause is None
