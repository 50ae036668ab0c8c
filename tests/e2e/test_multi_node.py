"""Launches across hosts: the ``hosts`` fixture's three hosts (slurm/local_hosts.sh: network
namespaces on this machine, each with its hostname, sshd, an interface that connects them
and one that leads nowhere), reached by horovodrun -H and mpirun --hostfile over ssh as
real nodes are. Each run's log says where its ranks ran ("hosts: node1 ranks 0-1, ...").

The hosts share this machine's 2 cores: --threads 1 everywhere.
"""

import json
import os
import re
import subprocess
import threading
import time

import numpy as np
import psutil
import pytest

from tests.helpers import (
    DIGITS_CNN,
    ENTRY,
    FRAMEWORKS,
    JOB_TIMEOUT,
    PYTHON,
    QUIET,
    REPO,
    assert_ok,
    checkpoint_path,
    checkpoint_weights,
    job_env,
    kill_tree,
    local_hosts,
    on_host,
    relative_difference,
    run_training,
)

HOROVODRUN = os.path.join(os.path.dirname(PYTHON), "horovodrun")
MPIRUN_NETWORK = ["--mca", "btl_tcp_if_include", "eth1", "--mca", "oob_tcp_if_include", "eth1"]
# mpirun's remote ranks start from sshd's environment: hand them the venv and the settings.
MPIRUN_ENV = ["-x", "PATH", "-x", "TF_CPP_MIN_LOG_LEVEL", "-x", "PYTHONUNBUFFERED"]
FEW_STEPS = ["--epochs", 1, "--steps-per-epoch", 3, "--lr", 0.1, "--momentum", 0.9, "--threads", 1, "--dropout", 0.25]


def run_on_node1(hosts, command, timeout=JOB_TIMEOUT):
    started = time.monotonic()
    result = subprocess.run(on_host(hosts, "node1", command), cwd=REPO, env=job_env(), capture_output=True,
                            text=True, timeout=timeout)
    result.seconds = time.monotonic() - started
    return result


def train_command(framework, args):
    return [PYTHON, ENTRY[framework], *QUIET, *args]


def completed_in(directory):
    """The run summary a job that ran to its end wrote into ``directory``/summary.json."""
    summary = json.loads((directory / "summary.json").read_text())
    assert summary["outcome"] == "completed", summary
    return summary


def weights_after_one_epoch(directory):
    return checkpoint_weights(checkpoint_path(directory, 1), DIGITS_CNN)


def assert_equals_one_process(tmp_path, framework, args, directory):
    single = tmp_path / "single"
    assert_ok(run_training([*FEW_STEPS, *args, "--checkpoint-dir", single], framework=framework))
    expected, got = weights_after_one_epoch(single), weights_after_one_epoch(directory)
    for name, value in expected.items():
        assert relative_difference(got[name], value) <= 1e-6, name


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_horovodrun_on_two_hosts_equals_one_process(hosts, tmp_path, framework):
    """4 ranks on 2 hosts, data mode, a 63-sample batch split 16/16/16/15, each share in two
    accumulated chunks, momentum: ≡ one process."""
    data = ["--batch-size", 63, "--accumulation-steps", 2]
    args = [*data, "--checkpoint-dir", tmp_path / "hosts", "--summary-file", tmp_path / "summary.json"]
    result = assert_ok(run_on_node1(hosts, [HOROVODRUN, "-np", 4, "-H", "node1:2,node2:2",
                                            "--network-interface", "eth1",
                                            *train_command(framework, [*FEW_STEPS, *args])]))
    assert completed_in(tmp_path)["hosts"] == {"node1": [0, 1], "node2": [2, 3]}, result.stdout
    assert_equals_one_process(tmp_path, framework, data, tmp_path / "hosts")


@pytest.mark.parametrize("framework,layout,placement,expected", [
    # One stage per host: the activations and gradients cross the network.
    ("torch", ["--mode", "model", "--pp", 2, "--microbatches", 4, "--schedule", "gpipe"], ["-np", 2, "--npernode", 1],
     ({"node1": [0], "node2": [1]}, [[0], [1]])),
    # Each pipeline inside one host (ranks 0-1 and 2-3), each stage's replicas
    # (ranks 0,2 and 1,3) allreducing across the hosts.
    ("tf", ["--mode", "hybrid", "--pp", 2, "--dp", 2, "--microbatches", 2], ["-np", 4],
     ({"node1": [0, 1], "node2": [2, 3]}, [[0, 2], [1, 3]])),
])
def test_mpirun_hostfile_pipelines_equal_one_process(hosts, tmp_path, framework, layout, placement, expected):
    args = [*layout, "--batch-size", 64, "--checkpoint-dir", tmp_path / "hosts", "--summary-file",
            tmp_path / "summary.json"]
    result = assert_ok(run_on_node1(hosts, ["mpirun", "--hostfile", hosts / "hostfile", *placement,
                                            "--bind-to", "none", *MPIRUN_NETWORK, *MPIRUN_ENV,
                                            *train_command(framework, [*FEW_STEPS, *args])]))
    summary = completed_in(tmp_path)
    assert (summary["hosts"], summary["stage_ranks"]) == expected, result.stdout
    assert_equals_one_process(tmp_path, framework, ["--batch-size", 64], tmp_path / "hosts")


def test_the_wrong_network_interface_fails_with_a_clear_line(hosts):
    """eth2 is up and addressed on every host but connects nothing: MPI's connection
    attempts over it go unanswered, and without the start-up deadline the ranks would
    wait (and spin) forever."""
    result = run_on_node1(hosts, [HOROVODRUN, "-np", 2, "-H", "node1:1,node2:1", "--network-interface", "eth2",
                                  *train_command("torch", [*FEW_STEPS, "--connect-timeout", 3])])
    assert result.returncode != 0 and result.seconds < 90, (result.seconds, result.stdout, result.stderr)
    output = result.stdout + result.stderr
    assert re.search(r"error: rank \d on node[12]: the job's ranks did not reach each other within 3 s", output)
    assert "--network-interface" in output and "btl_tcp_if_include" in output


@pytest.mark.serial  # a bound on the time the job takes to end
def test_a_lost_host_ends_the_job_promptly_naming_it(hosts, tmp_path):
    """Every process of node2 killed mid-step (its sshd, Open MPI's daemon and both ranks):
    the job ends within 30 s, and the log names the host lost."""
    command = on_host(hosts, "node1", ["mpirun", "--hostfile", hosts / "hostfile", "-np", 4, "--bind-to", "none",
                                       *MPIRUN_NETWORK, *MPIRUN_ENV,
                                       *train_command("torch", ["--epochs", 200, "--steps-per-epoch", 5,
                                                                "--threads", 1])])
    job = subprocess.Popen(command, cwd=REPO, env=job_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True)
    try:
        log = read_until(job, "epoch 2/200")
        lost_at = time.monotonic()
        assert local_hosts("kill", hosts, "node2").returncode == 0
        log += job.communicate(timeout=60)[0]
        ended_after = time.monotonic() - lost_at
    finally:
        kill_tree(job)
        assert local_hosts("revive", hosts, "node2").returncode == 0
    assert job.returncode != 0 and ended_after < 30, (ended_after, log)
    assert re.search(r"Remote daemon: .* on node node2", log) or "Peer host:  node2" in log, log


def read_until(job, marker):
    seen = []
    for line in job.stdout:
        seen.append(line)
        if marker in line:
            return "".join(seen)
    raise AssertionError(f"the job ended before {marker!r}:\n" + "".join(seen))




# Elastic TensorFlow across the hosts: lr 0.01 keeps float round-off (which differs with
# the number of workers) near 1e-6 (test_elastic.py says why).
ELASTIC_EPOCHS = 28  # the rejoin came at epoch 9-10 here
ELASTIC_ARGS = ["--epochs", ELASTIC_EPOCHS, "--lr", 0.01, "--threads", 1, "--keep-checkpoints", ELASTIC_EPOCHS,
                "--dropout", 0.25]


@pytest.mark.serial  # a joining worker must start within the Gloo timeout
def test_elastic_tensorflow_loses_a_host_rolls_back_and_takes_it_back(hosts, tmp_path):
    """One worker per host; node3 is killed whole in epoch 3, the workers on node1 and node2
    roll back to their last commit and go on; node3 is brought back, its worker joins. The
    epoch that held the failure ends where an uninterrupted run's does."""
    hosts_file = tmp_path / "hosts.txt"
    hosts_file.write_text("node1:1\nnode2:1\nnode3:1\n")
    command = on_host(hosts, "node1", [
        HOROVODRUN, "-np", 3, "--min-np", 2, "--max-np", 3, "--network-interface", "eth1",
        "--host-discovery-script", os.path.join(REPO, "common", "launch", "discover_hosts.sh"),
        "--blacklist-cooldown-range", 2, 3,
        PYTHON, ENTRY["tf"], "--elastic", "--elastic-commit-steps", 5, *QUIET,
        "--checkpoint-dir", tmp_path / "elastic", "--summary-file", tmp_path / "summary.json", *ELASTIC_ARGS])
    env = dict(job_env(), HOSTS_FILE=str(hosts_file), HOROVOD_GLOO_TIMEOUT_SECONDS="20")
    job = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    watchdog = threading.Timer(JOB_TIMEOUT, kill_tree, [job])  # a hang fails the test, not CI
    watchdog.start()
    try:
        log = read_until(job, f"epoch 3/{ELASTIC_EPOCHS}")
        assert local_hosts("kill", hosts, "node3").returncode == 0
        log += read_until(job, "elastic: 3 -> 2 workers")
        assert local_hosts("revive", hosts, "node3").returncode == 0
        log += job.communicate()[0]
    finally:
        watchdog.cancel()
        kill_tree(job)
    assert job.returncode == 0, log
    summary = completed_in(tmp_path)
    assert summary["epochs_done"] == ELASTIC_EPOCHS, log
    shrink, grow = summary["membership_changes"]
    assert (shrink["before"], shrink["after"], grow["before"], grow["after"]) == (3, 2, 2, 3), log

    assert_ok(run_training([*ELASTIC_ARGS, "--checkpoint-dir", tmp_path / "straight"], framework="tf"))
    recovered = shrink["epochs_done"] + 1
    straight = checkpoint_weights(checkpoint_path(tmp_path / "straight", recovered))
    elastic = checkpoint_weights(checkpoint_path(tmp_path / "elastic", recovered))
    for key, value in straight.items():
        assert relative_difference(elastic[key], value) <= 1e-5, (recovered, key)
    # After the rejoin: a sanity bound (test_elastic.py says why not more), which a joining
    # worker that kept its own initial weights instead of receiving rank 0's would break.
    straight = checkpoint_weights(checkpoint_path(tmp_path / "straight", ELASTIC_EPOCHS))
    elastic = checkpoint_weights(checkpoint_path(tmp_path / "elastic", ELASTIC_EPOCHS))
    assert relative_difference(np.concatenate([elastic[key].ravel() for key in straight]),
                               np.concatenate([value.ravel() for value in straight.values()])) <= 1e-2


FAILING_TEST = """
import subprocess
from tests.conftest import hosts  # noqa: F401 (the fixture)
from tests.helpers import on_host

def test_fails_while_a_job_runs_on_the_hosts(hosts):
    subprocess.Popen(on_host(hosts, "node2", ["sh", "-c", f"sleep 600; : {hosts}"]))  # named by its host dir
    assert False, "deliberately"
"""


def test_a_failed_test_leaves_no_namespace_link_or_process(tmp_path):
    """A test that fails while a process runs on the hosts: the fixture's finalizer
    removes every namespace, link and process."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces and sshd need root (CI runs as root)")
    (tmp_path / "test_deliberate_failure.py").write_text(FAILING_TEST)
    base = tmp_path / "pytest"
    result = subprocess.run([PYTHON, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--basetemp={base}",
                             "--rootdir", REPO, str(tmp_path / "test_deliberate_failure.py")],
                            cwd=REPO, env=dict(job_env(), PYTHONPATH=REPO), capture_output=True, text=True,
                            timeout=JOB_TIMEOUT)
    assert result.returncode == 1 and "deliberately" in result.stdout, result.stdout + result.stderr
    prefix = next(base.glob("*/prefix")).read_text().strip()
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    assert prefix not in netns and prefix not in links, (prefix, netns, links)
    assert not [process for process in psutil.process_iter(["cmdline"])
                if str(base) in " ".join(process.info["cmdline"] or [])]
