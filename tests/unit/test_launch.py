"""A rank's view of its launcher: which ancestors it lives by, and noticing their end."""

import subprocess
import sys
import threading

from common.launch import cpu_budget, placement, supervision
from common.launch.supervision import Process


def process(pid, *words):
    return Process(pid, 1000 + pid, tuple(words))


def test_a_rank_watches_its_ancestors_up_to_the_outermost_launcher():
    rank_parent = process(30, "mpirun", "--tag-output", "-np", "2", "/v/bin/python", "main.py")
    shell = process(20, "/bin/sh", "-c", "mpirun --tag-output -np 2 python main.py")  # what horovodrun exec'd
    login = process(10, "bash")
    assert supervision.launcher_chain([rank_parent, shell, login]) == [rank_parent, shell]
    assert supervision.launcher_chain([rank_parent, login]) == [rank_parent]  # typed in a shell: not the shell
    elastic = [process(5, "/bin/sh", "-c", "env HOROVOD_RANK=0 python main.py"), process(4, "python", "-c", "spawn"),
               process(3, "python", "/v/bin/horovodrun", "-np", "2", "python", "main.py"), login]
    assert supervision.launcher_chain(elastic) == elastic[:3]
    orted = process(40, "orted", "-mca", "ess", "env")  # a remote host: no launcher here, its daemon is enough
    assert supervision.launcher_chain([orted, process(39, "sshd")]) == [orted]
    assert supervision.launcher_chain([]) == []
    assert elastic[2].describe() == "pid 3: horovodrun -np 2"
    assert rank_parent.describe(width=12) == "pid 30: mpirun --tag ..."


def test_the_end_of_a_watched_process_is_noticed_at_once_and_a_process_reused_pid_is_not_it():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        watched = supervision._read_process(child.pid)[0]
        assert watched.alive() and not Process(child.pid, watched.started + 1, watched.words).alive()
        causes, noticed = [], threading.Event()
        watch = supervision.LauncherWatch([watched], lambda cause: (causes.append(cause), noticed.set()), grace=300)
        try:
            assert not noticed.wait(0.3)  # alive: nothing to say
            child.kill()
            assert noticed.wait(10), "the watch did not notice"
        finally:
            watch.close()  # before its grace ends the test process
        assert len(causes) == 1 and causes[0].startswith(f"the end of its launcher (pid {child.pid}: ")
        assert not watched.alive()  # also as a zombie, not yet reaped
    finally:
        child.kill()
        child.wait()


def test_a_closed_watch_stops_quietly_and_a_rank_without_a_launcher_watches_nothing(monkeypatch):
    for name in ("HOROVOD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "PMI_SIZE", "SLURM_NTASKS", "HOROVOD_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert supervision.watch_launcher(lambda cause: None).watched == []  # nohup python main.py & outlives its shell
    watch = supervision.LauncherWatch([supervision.ancestors()[0]], lambda cause: None)
    watch.close()
    assert watch.cause is None


def share(cpuset=16, affinity=16, quota=None, slurm=None, local=1):
    return cpu_budget.CpuShare(cpuset=cpuset, affinity=affinity, quota=quota, slurm_cpus_per_task=slurm,
                               local_ranks=local)


def test_threads_per_rank_follow_the_cpus_the_rank_may_use():
    assert share(cpuset=128, affinity=128, slurm=8, local=16).threads() == (8, "SLURM_CPUS_PER_TASK=8")
    assert share(cpuset=2, affinity=2, local=2).threads() == (1, "2 CPUs / 2 ranks here")
    assert share(cpuset=16, affinity=4, local=4).threads() == (4, "bound to 4 of 16 CPUs")  # mpirun --bind-to
    assert share(cpuset=8, affinity=8, local=4).threads() == (2, "8 CPUs / 4 ranks here")  # a container's cpuset
    assert share(cpuset=64, affinity=64, quota=2.5, local=2).threads() == (1, "a CPU quota of 2.5 / 2 ranks here")
    assert share(cpuset=64, affinity=64, quota=16.0, local=2).threads() == (8, "a CPU quota of 16 / 2 ranks here")
    assert share(cpuset=2, affinity=2, local=3).threads()[0] == 1  # never none
    assert share(cpuset=64, affinity=64, quota=96.0, local=2).threads() == (32, "64 CPUs / 2 ranks here")


def test_cpu_lists_and_quotas_parse_as_the_kernel_writes_them():
    assert cpu_budget.parse_cpu_list("0-3,8,10-11\n") == 7 and cpu_budget.parse_cpu_list("5") == 1
    assert cpu_budget.parse_cpu_max("200000 100000\n") == 2.0 and cpu_budget.parse_cpu_max("max 100000") is None
    here = cpu_budget.read_cpu_share(local_ranks=2)
    assert here.local_ranks == 2 and 1 <= here.affinity <= here.cpuset and here.threads()[0] >= 1


def test_host_placement_names_each_hosts_ranks_in_order():
    assert placement.host_placement(["node1", "node1", "node2", "node2"]) == "hosts: node1 ranks 0-1, node2 ranks 2-3"
    # Round-robin (mpirun --map-by node): each host's ranks are not contiguous.
    assert placement.host_placement(["b", "a", "b", "a", "b"]) == "hosts: b ranks 0,2,4, a ranks 1,3"
    assert placement.host_placement(["n1", "n2", "n2", "n2", "n1"]) == "hosts: n1 ranks 0,4, n2 ranks 1-3"
    assert placement.host_placement(["solo"]) == "hosts: solo rank 0"


def test_fault_injection_fails_only_the_chosen_rank_at_the_chosen_point(monkeypatch):
    import pytest

    from common.launch.faults import FaultInjection

    FaultInjection(None).at(0, 3)  # unset: nothing happens anywhere
    chosen = FaultInjection("1:3:raise")
    chosen.at(0, 3)
    chosen.at(1, 2)
    with pytest.raises(RuntimeError, match="injected failure on rank 1 at 3"):
        chosen.at(1, 3)
    monkeypatch.setenv("HOROVOD_HOSTNAME", "worker-b")  # elastic: chosen by the host Horovod gave the worker
    with pytest.raises(RuntimeError, match="at save"):
        FaultInjection("worker-b:save:raise").at(5, "save")
    FaultInjection("worker-a:save:raise").at(5, "save")


def test_supervision_says_nothing_ended_until_its_watch_sees_an_end():
    watched = supervision.Supervision()
    assert watched.launcher_gone is None  # not started: the entry reads None
    watch = watched.start(lambda cause: None)  # this test process has no launcher to watch
    assert watch.watched == [] and watched.launcher_gone is None
    watch.cause = "the end of its launcher (pid 1: mpirun)"  # what the watch's thread sets
    assert watched.launcher_gone == "the end of its launcher (pid 1: mpirun)"
    watch.close()
