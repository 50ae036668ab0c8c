"""The sbatch templates, submitted to a real two-node Slurm started here.

slurm/local_cluster.sh installs Debian's Slurm and munge when missing and starts
slurmctld and one slurmd per host of the ``hosts`` fixture (node1..node3, network
namespaces: slurm/local_hosts.sh), with their own config and state in a temporary
directory, and stops them (by PID) afterwards. Jobs are submitted on node1 and run
on two nodes, over the hosts' cluster interface (NETWORK_INTERFACE=eth1). Job states
are polled with scontrol (sbatch --wait's back-off adds up to 30 s per job).
"""

import json
import os
import re
import subprocess
import time

import pytest

from tests.helpers import PYTHON, REPO, job_env, on_host

TEMPLATES = ("srun", "mpirun", "horovodrun")
JOB_LIMIT = 240


def run_on_node1(env, command, check=True):
    return subprocess.run(on_host(env["HOSTS_DIR"], "node1", command), cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=60, check=check)


def slurm(env, *command):
    return run_on_node1(env, command).stdout


@pytest.fixture(scope="module")
def cluster(hosts, tmp_path_factory):
    directory = tmp_path_factory.mktemp("slurm")
    script = os.path.join(REPO, "slurm", "local_cluster.sh")
    started = subprocess.run(["bash", script, "start", str(directory), "--hosts", str(hosts)], capture_output=True,
                             text=True, timeout=600)
    assert started.returncode == 0, started.stdout + started.stderr
    env = job_env()
    env.update(SLURM_CONF=str(directory / "slurm.conf"), RUN_ROOT=str(directory / "runs"),
               VENV=os.path.dirname(os.path.dirname(PYTHON)), NETWORK_INTERFACE="eth1", HOSTS_DIR=str(hosts))
    yield directory, env
    subprocess.run(["bash", script, "stop", str(directory)], timeout=60)


def submit(cluster, template, name, **variables):
    directory, env = cluster
    env = {**env, **variables}
    output = directory / f"{name}-%j.out"
    job = slurm(env, "sbatch", "--parsable", "--nodes=2", f"--job-name={name}", f"--output={output}",
                os.path.join(REPO, "slurm", template)).strip().split(";")[0]
    return job, env, directory / f"{name}-{job}.out"


def job_field(env, job, field):
    match = re.search(rf"\b{field}=(\S+)", slurm(env, "scontrol", "show", "job", job))
    return match.group(1) if match else None


def wait_for(condition, what, limit=JOB_LIMIT):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.3)  # polling a job's state, not standing in for a sync
    raise AssertionError(f"timed out waiting for {what}")


def run_summary(cluster, job_name):
    """The run summary of the job's run directory (slurm/job.sh: RUN_ROOT/<job name>)."""
    return json.loads((cluster[0] / "runs" / job_name / "summary.json").read_text())


def finished(env, job):
    return job_field(env, job, "JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL")


@pytest.mark.parametrize("launcher", TEMPLATES)
def test_cpu_template_trains(cluster, launcher):
    job, env, output = submit(cluster, f"cpu_{launcher}.sbatch", f"test-{launcher}", EPOCHS="1",
                              TRAIN_ARGS="--steps-per-epoch 5")
    wait_for(lambda: finished(env, job), f"job {job}")
    log = output.read_text()
    assert job_field(env, job, "JobState") == "COMPLETED" and job_field(env, job, "ExitCode") == "0:0", log
    summary = run_summary(cluster, f"test-{launcher}")
    assert (summary["outcome"], summary["world_size"]) == ("completed", 4), log  # four ranks trained together
    assert summary["hosts"] == {"node1": [0, 1], "node2": [2, 3]}, log  # on both nodes
    # command.sh repeats the launch as the job script typed it, and says how to submit the job again.
    *_, submitted, _, command = (cluster[0] / "runs" / f"test-{launcher}" / "command.sh").read_text().splitlines()
    assert command.startswith(f"{launcher} ") and " -x NCCL" not in command, command
    assert submitted.startswith(f"# Slurm job {job}; to submit it again: ") and \
        f"sbatch --nodes=2 --ntasks-per-node=2 --job-name=test-{launcher} " in submitted and \
        submitted.endswith(os.path.join("slurm", f"cpu_{launcher}.sbatch")), submitted


def test_preempted_job_checkpoints_requeues_and_finishes(cluster):
    job, env, output = submit(cluster, "cpu_mpirun.sbatch", "test-preempt", EPOCHS="3",
                              TRAIN_ARGS="--dataset synthetic --synthetic-shape 1,8,8 "
                                         "--synthetic-samples 6000 --batch-size 16")
    wait_for(lambda: output.exists() and "epoch 1/3" in output.read_text(), "the first epoch")
    slurm(env, "scancel", "--signal=USR1", "--batch", job)  # what --signal=B:USR1@120 sends
    wait_for(lambda: job_field(env, job, "Restarts") == "1" and job_field(env, job, "JobState") == "PENDING",
             "the requeue")
    # Skip most of Slurm's requeue delay, but not all: a job started again within
    # the second its previous run was killed finds its credential revoked.
    slurm(env, "scontrol", "update", f"JobId={job}", "StartTime=now+2")
    wait_for(lambda: finished(env, job), f"job {job} after requeue")

    log = output.read_text()
    assert job_field(env, job, "JobState") == "COMPLETED" and job_field(env, job, "ExitCode") == "0:0", log
    assert re.search(r"stopped by SIGUSR1 after \d+ steps of epoch [23]; saved .*ckpt-epoch", log), log
    assert "requeueing job" in log and "restart 1" in log, log
    summary = run_summary(cluster, "test-preempt")  # the requeued run's
    assert summary["outcome"] == "completed" and summary["epochs_done"] == 3, log
    assert summary["resumed"]["steps_into_next"] > 0, log  # from the checkpoint the stop saved mid-epoch
    assert summary["hosts"] == {"node1": [0, 1], "node2": [2, 3]}, log  # on both nodes
    assert log.count("hosts: node1 ranks 0-1, node2 ranks 2-3") == 2, log  # and so was the first run
    metrics = (cluster[0] / "runs" / "test-preempt" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in metrics] == [1, 2, 3], log  # no epoch twice
    checkpoints = cluster[0] / "runs" / "test-preempt" / "checkpoints"
    assert (checkpoints / "ckpt-epoch0003" / "COMPLETE").exists()


@pytest.mark.parametrize("launcher", TEMPLATES)
def test_cpu_template_is_accepted_by_the_scheduler(cluster, launcher):
    """sbatch --test-only validates the directives against the cluster without
    running anything (GPU templates need GPU nodes: this cluster has none)."""
    directory, env = cluster
    result = run_on_node1(env, ["sbatch", "--test-only", os.path.join(REPO, "slurm", f"cpu_{launcher}.sbatch")],
                          check=False)
    assert result.returncode == 0 and "to start at" in result.stderr, result.stderr
