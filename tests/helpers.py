"""Launch helpers for the parallel and end-to-end tiers."""

import json
import os
import pathlib
import subprocess
import sys
import tempfile
from collections.abc import Callable

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable
BIN = os.path.dirname(PYTHON)
ENTRY = {"torch": os.path.join(REPO, "train_torch", "main.py"),
         "tf": os.path.join(REPO, "train_tf", "main.py")}
# No bar, and no run directory unless a test asks for one (later flags win).
QUIET = ("--no-progress", "--run-dir", "none")
# A generous bound: a hung job fails the test instead of hanging CI.
JOB_TIMEOUT = 300


LOCAL_HOSTS = os.path.join(REPO, "slurm", "local_hosts.sh")


def local_hosts(*args, timeout=120):
    """slurm/local_hosts.sh ARGS (start, stop, kill, revive)."""
    return subprocess.run(["bash", LOCAL_HOSTS, *map(str, args)], capture_output=True, text=True, timeout=timeout)


def on_host(hosts, host, command):
    """``command`` (a list) as run from a shell on ``host`` of the local hosts in ``hosts``."""
    return ["bash", LOCAL_HOSTS, "exec", str(hosts), host, "--", *map(str, command)]


def job_env():
    env = dict(os.environ)
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1",
               PATH=BIN + os.pathsep + env.get("PATH", ""))
    return env


def launch_command(np_, launcher):
    if np_ is None:
        return [PYTHON]
    if launcher == "horovodrun":
        return [os.path.join(BIN, "horovodrun"), "-np", str(np_), PYTHON]
    oversubscribe = ["--oversubscribe"] if np_ > (os.cpu_count() or 1) else []
    return ["mpirun", "-np", str(np_), *oversubscribe, "--bind-to", "none", PYTHON]


class Training(subprocess.CompletedProcess):
    """A finished training job, with its run summary (``summary``: the --summary-file's
    record, None when the job wrote none)."""

    summary: dict | None = None


def _summary_flags(args) -> tuple[list, Callable[[], dict | None]]:
    """Flags that put the job's run summary where the test reads it: its own run directory
    when it names one, else a file of its own (a test's own --summary-file comes later and wins)."""
    run_dirs = [value for flag, value in zip(map(str, args), map(str, args[1:])) if flag == "--run-dir"]
    if run_dirs and run_dirs[-1] != "none":
        path = os.path.join(REPO, run_dirs[-1], "summary.json")
        return [], lambda: _read_summary(path)
    handle, path = tempfile.mkstemp(prefix="summary-", suffix=".json")
    os.close(handle)
    os.unlink(path)

    def read():
        try:
            return _read_summary(path)
        finally:
            if os.path.exists(path):
                os.unlink(path)
    return ["--summary-file", path], read


def _read_summary(path) -> dict | None:
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def finished(command, returncode, stdout, stderr, read_summary) -> Training:
    result = Training(command, returncode, stdout, stderr)
    result.summary = read_summary()
    return result


def run_training(args, np_=None, framework="torch", launcher="mpirun", timeout=JOB_TIMEOUT) -> Training:
    """Run an entry script (one process when ``np_`` is None) and read its run summary."""
    summary_flags, read_summary = _summary_flags(args)
    command = [*launch_command(np_, launcher), ENTRY[framework], *QUIET, *summary_flags, *map(str, args)]
    try:
        result = subprocess.run(command, cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=timeout)
    except BaseException:
        read_summary()
        raise
    return finished(command, result.returncode, result.stdout, result.stderr, read_summary)


def first_epoch_after(log, marker):
    """The number of the first epoch a (launcher-prefixed) log reports after ``marker``."""
    tail = log[log.index(marker):]
    line = next(line for line in tail.splitlines() if line.split(":", 1)[-1].startswith("epoch "))
    return int(line.split(":", 1)[-1].split()[1].split("/")[0])


def assert_ok(result):
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


def completed(result: Training) -> dict:
    """The run summary of a job that trained (or evaluated) to its end."""
    assert_ok(result)
    assert result.summary and result.summary["outcome"] == "completed", \
        f"{result.summary}\n{result.stdout}\n{result.stderr}"
    return result.summary


def final_accuracy(result: Training) -> float:
    return completed(result)["test_accuracy"]


def relative_difference(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


FRAMEWORKS = ("torch", "tf")
DIGITS_CNN = {"model": "cnn", "input_shape": [1, 8, 8], "num_classes": 10}


def folder_args(root, size=16):
    """Train on an image folder (the elpv_small fixture) at ``size`` px, augmentation on."""
    return ["--dataset", "folder", "--data-dir", root, "--image-size", size, "--data-workers", 1]


def folder_cnn(size=16):
    return {"model": "cnn", "input_shape": [1, size, size], "num_classes": 2}


def checkpoint_path(directory, epoch, step=0):
    """Where a run saves after ``epoch`` epochs (and ``step`` steps into the next)."""
    from common.model.checkpoint import checkpoint_path as path

    return pathlib.Path(path(str(directory), (epoch, step)))


def resumed_after(directory, epochs_done, steps=0) -> dict:
    """The run summary's record of a resume from the checkpoint after ``epochs_done`` (+ ``steps``)."""
    return {"path": str(checkpoint_path(directory, epochs_done, steps)), "epochs_done": epochs_done,
            "steps_into_next": steps}


def _open(path, architecture):
    from common.model import checkpoint, networks, weights

    architecture = architecture or DIGITS_CNN
    specs = networks.model_specs(architecture["model"], tuple(architecture["input_shape"]),
                               architecture["num_classes"])
    return checkpoint.Checkpoint(str(path), architecture,
                                 weights.expected_shapes(specs, tuple(architecture["input_shape"])))


def checkpoint_weights(path, architecture=None):
    """Neutral-layout model weights of a checkpoint (either framework's: there is one format)."""
    opened = _open(path, architecture)
    return opened.state(opened.expected_shapes, None).weights


def optimizer_arrays(path, architecture=None):
    """The optimizer's per-parameter state of a checkpoint, {key/slot: array}."""
    opened = _open(path, architecture)
    states = opened.state(opened.expected_shapes, opened.meta["optimizer"]).optimizer
    return {f"{key}/{slot}": value for key, slots in states.items() for slot, value in slots.items()}


def run_and_signal_one_rank(args, np_, framework, after_line, signal_number):
    """Start a job, wait until it prints ``after_line``, send ``signal_number`` to
    one rank (the last one started), and wait for the job to end."""
    import psutil

    summary_flags, read_summary = _summary_flags(args)
    command = [*launch_command(np_, "mpirun"), ENTRY[framework], *QUIET, *summary_flags, *map(str, args)]
    job = subprocess.Popen(command, cwd=REPO, env=job_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    seen = []
    for line in job.stdout:
        seen.append(line)
        if after_line in line:
            break
    ranks = [child for child in psutil.Process(job.pid).children(recursive=True)
             if ENTRY[framework] in " ".join(child.cmdline())]
    assert ranks, "no rank found to signal"
    max(ranks, key=lambda child: child.create_time()).send_signal(signal_number)
    stdout, stderr = job.communicate(timeout=JOB_TIMEOUT)
    return finished(command, job.returncode, "".join(seen) + stdout, stderr, read_summary)


def kill_tree(job):
    """Kill a launched job and everything it started (nothing may outlive a test)."""
    import psutil

    try:
        processes = [*psutil.Process(job.pid).children(recursive=True), psutil.Process(job.pid)]
    except psutil.NoSuchProcess:
        return
    for process in processes:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
