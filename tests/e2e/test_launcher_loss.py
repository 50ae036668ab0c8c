"""The launcher goes away: every rank stops, none is left training on its own.

Each rank writes its output to a file of its own (a shell redirect in front of the
entry script), so what a rank says survives the launcher whose pipes carried it.
"""

import os
import re
import signal
import subprocess
import time

import psutil
import pytest

from tests.helpers import BIN, ENTRY, JOB_TIMEOUT, PYTHON, REPO, job_env

STOP_WITHIN = 30  # seconds, from the signal to the last process of the job
# Long enough to be killed mid-training: an epoch of 20 steps, 500 of them.
TRAIN = ["--dataset", "synthetic", "--synthetic-shape", "1,8,8", "--synthetic-samples", 4096, "--model", "cnn",
         "--epochs", 500, "--steps-per-epoch", 20, "--batch-size", 32, "--threads", 1, "--no-progress",
         "--run-dir", "none"]


def rank_command(tmp_path, rank_variable, extra=()):
    """The entry script, its output sent to rank-N.log by a shell that then becomes it."""
    flags = " ".join(map(str, [*TRAIN, "--checkpoint-dir", tmp_path / "ckpt", *extra]))
    return ["sh", "-c", f'exec {PYTHON} {ENTRY["torch"]} {flags} > {tmp_path}/rank-${rank_variable}.log 2>&1']


def launch(tmp_path, command, env=None):
    job = subprocess.Popen(command, cwd=REPO, env=env or job_env(), stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, start_new_session=True)  # signals reach the launcher alone
    rank0 = tmp_path / "rank-0.log"
    deadline = time.monotonic() + JOB_TIMEOUT
    while "epoch 1/" not in (rank0.read_text() if rank0.exists() else ""):
        assert job.poll() is None and time.monotonic() < deadline, f"the job did not start training: {job.poll()}"
        time.sleep(0.2)  # polling for the first epoch line, not waiting a fixed time
    return job, [psutil.Process(job.pid), *psutil.Process(job.pid).children(recursive=True)]


def job_processes(tmp_path):
    """Every process whose command line names this test's directory: ranks, mpirun, orted, wrappers."""
    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        if process.info["status"] != psutil.STATUS_ZOMBIE and str(tmp_path) in " ".join(process.info["cmdline"] or []):
            found.append(process)
    return found


def kill_and_wait(tmp_path, job, processes, signal_name):
    job.send_signal(getattr(signal, signal_name))
    try:
        gone, alive = psutil.wait_procs(processes, timeout=STOP_WITHIN)
        left = [process for process in job_processes(tmp_path) if process.pid != os.getpid()]
        assert not alive and not left, f"still running {STOP_WITHIN} s after {signal_name}: {alive + left}"
    finally:
        for process in job_processes(tmp_path):
            process.kill()
        job.wait()


def saved_stop(log):
    """The checkpoint a graceful stop names, after checking it is complete."""
    match = re.search(r"stopped by (.+?) (?:after .+?); saved (\S+); continue with --resume", log)
    assert match, log
    assert os.path.exists(os.path.join(REPO, match.group(2), "COMPLETE")), match.group(2)
    return match.group(1)


@pytest.mark.parametrize("launcher", ["horovodrun", "mpirun"])
@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGINT", "SIGHUP", "SIGKILL"])
def test_a_launcher_that_goes_away_takes_every_rank_with_it(tmp_path, launcher, signal_name):
    ranks = rank_command(tmp_path, "OMPI_COMM_WORLD_RANK")
    starter = ([os.path.join(BIN, "horovodrun"), "-np", "2"] if launcher == "horovodrun"
               else ["mpirun", "-np", "2", "--bind-to", "none"])
    job, processes = launch(tmp_path, [*starter, *ranks])
    kill_and_wait(tmp_path, job, processes, signal_name)
    logs = [(tmp_path / f"rank-{rank}.log").read_text() for rank in (0, 1)]
    assert not any("Traceback" in log for log in logs), logs
    if signal_name == "SIGKILL":  # no word from the launcher: each rank sees it gone and says so
        for rank, log in enumerate(logs):  # (Open MPI ends them soon after: the save is a race, not asserted)
            assert re.search(rf"rank {rank}: the end of its launcher \(pid {job.pid}: mpirun .*\): stopping", log), log
    else:  # mpirun ends its job by sending SIGTERM (horovodrun is mpirun, exec'd): the graceful stop
        assert saved_stop(logs[0]) == "SIGTERM"


def test_an_elastic_worker_outlives_no_killed_horovodrun(tmp_path):
    hosts = tmp_path / "hosts.txt"
    hosts.write_text("127.0.0.1:1\nlocalhost:1\n")
    command = [os.path.join(BIN, "horovodrun"), "-np", "2", "--min-np", "1", "--max-np", "2",
               "--host-discovery-script", os.path.join(REPO, "common", "launch", "discover_hosts.sh"),
               *rank_command(tmp_path, "HOROVOD_RANK", ["--elastic"])]
    job, processes = launch(tmp_path, command, dict(job_env(), HOSTS_FILE=str(hosts)))
    kill_and_wait(tmp_path, job, processes, "SIGKILL")
    # Each worker sees the driver gone and says so (then Horovod's middleman sends it SIGTERM, or
    # its Gloo store, lost with the driver, aborts it: the save is a race, not asserted).
    for rank in (0, 1):
        log = (tmp_path / f"rank-{rank}.log").read_text()
        assert re.search(rf"rank {rank}: the end of its launcher \(pid {job.pid}: horovodrun -np 2 ", log), log
