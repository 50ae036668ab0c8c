"""One directory per run: its metrics, TensorBoard events, timeline and checkpoints,
and what it takes to repeat it (the command line, the launcher, the resolved
configuration).

    runs/20261127-195501-torch-data/
        command.sh          the launch, once per start (a resume appends); bash it to repeat
        config.json         every flag as resolved, the world size, versions, the git commit
        config.toml         the settings as given: --config config.toml repeats the run
        metrics.jsonl       one record per epoch (--metrics-file)
        summary.json        what the run did, written at its end (--summary-file)
        events.out.tfevents.*   TensorBoard (--tensorboard): tensorboard --logdir runs/
        checkpoints/        ckpt-epochNNNN (--checkpoint-dir)
        timeline.json       with a bare --timeline

A flag given explicitly keeps its own path; ``--run-dir none`` writes only what
the flags ask for. The primary rank picks the default name (the time it started)
and every rank is told it, so a job never splits over two directories.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
from dataclasses import dataclass

from common import REPOSITORY
from common.core.errors import UsageError
from common.launch import hardware
from common.launch.supervision import LAUNCHERS, ancestors, launcher_words

NO_RUN_DIR = "none"
DEFAULT_ROOT = "runs"
TIMELINE_IN_RUN_DIR = "<run-dir>/timeline.json"   # what a bare --timeline means
METRICS_NAME, SUMMARY_NAME = "metrics.jsonl", "summary.json"
CHECKPOINTS_NAME, TIMELINE_NAME = "checkpoints", "timeline.json"
CONFIG_NAME, COMMAND_NAME, TOML_NAME = "config.json", "command.sh", "config.toml"


def default_name(framework: str, mode: str, now: datetime.datetime) -> str:
    return f"{now:%Y%m%d-%H%M%S}-{framework}-{mode}"


def claim(config, framework: str, now: datetime.datetime | None = None) -> str | None:
    """On the primary rank: the run directory (created), or None with --run-dir none.
    A default name taken by a run started in the same second gets a suffix."""
    if config.run_dir == NO_RUN_DIR:
        return None
    if config.run_dir:
        directory = config.run_dir
        _make(directory, exist_ok=True)
        return directory
    base = os.path.join(DEFAULT_ROOT, default_name(framework, config.mode, now or datetime.datetime.now()))
    for suffix in range(1, 1000):
        directory = base if suffix == 1 else f"{base}-{suffix}"
        if _make(directory, exist_ok=False):
            return directory
    raise UsageError(f"cannot find a free run directory name beside {base}; pass --run-dir DIR")


def _make(directory: str, exist_ok: bool) -> bool:
    try:
        os.makedirs(directory, exist_ok=exist_ok)
        return True
    except FileExistsError:
        return False
    except OSError as error:
        raise UsageError(f"cannot create the run directory {directory} ({error.strerror}); "
                         "choose a writable --run-dir (or --run-dir none)") from None


@dataclass(frozen=True)
class RunPaths:
    """Where a run's outputs go, once the run directory is settled ("" for an output not
    asked for): the flags' paths, or the run directory's places for those left unset."""
    run_dir: str
    metrics_file: str
    summary_file: str
    tensorboard: str
    checkpoint_dir: str
    timeline: str


def place_outputs(config, directory: str | None) -> RunPaths:
    """Every output the user did not point elsewhere goes into ``directory`` (None: --run-dir
    none, so only the outputs the flags name)."""
    if directory is None:
        if config.timeline == TIMELINE_IN_RUN_DIR:
            raise UsageError("a bare --timeline writes into the run directory; with --run-dir none "
                             "name the file: --timeline FILE")
        return RunPaths(config.run_dir, config.metrics_file, config.summary_file, config.tensorboard,
                        config.checkpoint_dir, config.timeline)
    return RunPaths(run_dir=directory, metrics_file=config.metrics_file or os.path.join(directory, METRICS_NAME),
                    summary_file=config.summary_file or os.path.join(directory, SUMMARY_NAME),
                    tensorboard=config.tensorboard or directory,
                    checkpoint_dir=config.checkpoint_dir or os.path.join(directory, CHECKPOINTS_NAME),
                    timeline=os.path.join(directory, TIMELINE_NAME) if config.timeline == TIMELINE_IN_RUN_DIR
                    else config.timeline)


def record(directory: str, config, framework: str, world_size: int, argv: list | None = None,
           now: datetime.datetime | None = None, repeat_toml: str | None = None,
           paths: RunPaths | None = None) -> None:
    """On the primary rank: append this start's launch to command.sh, write config.json, and
    ``repeat_toml`` as config.toml (a --config file of the settings as given)."""
    try:
        _write_record(directory, resolved(config, paths), framework, world_size,
                      list(sys.argv if argv is None else argv), now or datetime.datetime.now().astimezone())
        if repeat_toml is not None:
            _write_whole(os.path.join(directory, TOML_NAME), repeat_toml)
    except OSError as error:
        raise UsageError(f"cannot write to the run directory {directory} ({error.strerror}); "
                         "choose a writable --run-dir (or --run-dir none)") from None


def resolved(config, paths: RunPaths | None) -> dict:
    """Every flag's value, the outputs' as placed: what config.json and checkpoints record."""
    return {**dataclasses.asdict(config), **(dataclasses.asdict(paths) if paths else {})}


def _write_record(directory: str, settings: dict, framework: str, world_size: int, argv: list,
                  now: datetime.datetime) -> None:
    launcher = launcher_command()
    command_path = os.path.join(directory, COMMAND_NAME)
    fresh = not os.path.exists(command_path)
    with open(command_path, "a", encoding="utf-8") as script:
        if fresh:
            script.write("#!/bin/bash\n# Repeat this run: bash command.sh [more flags, e.g. --run-dir runs/again]\n"
                         "set -e\n")
        script.write(f"\n# {now.isoformat(timespec='seconds')}: {world_size} rank(s) on {platform.node()}"
                     f"{', launched by ' + launcher[0] if launcher else ''}\n")
        if os.environ.get(SLURM_SUBMIT):
            script.write(f"# Slurm job {os.environ.get('SLURM_JOB_ID', '?')}; to submit it again: "
                         f"{os.environ[SLURM_SUBMIT].strip()}\n")
        script.write(f"cd {shlex.quote(os.getcwd())}\n")
        script.write(shlex.join([*(launcher or []), sys.executable if launcher else "python", *argv])
                     + ' "$@"\n')
    os.chmod(command_path, 0o755)
    description = {"started": now.isoformat(timespec="seconds"), "framework": framework, "world_size": world_size,
                   "host": platform.node(), "command": argv, "launcher": launcher, "cwd": os.getcwd(),
                   "cpu": hardware.cpu_model(), "cpu_features": hardware.cpu_features().names(),
                   "python": platform.python_version(), "git_commit": git_commit(),
                   "slurm_job": os.environ.get("SLURM_JOB_ID"),
                   "config": settings}
    temporary = os.path.join(directory, f".{CONFIG_NAME}.tmp")
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(description, handle, indent=1, sort_keys=True)
        handle.write("\n")
    os.replace(temporary, os.path.join(directory, CONFIG_NAME))


def _write_whole(path: str, text: str) -> None:
    temporary = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp")
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(temporary, path)


HOROVODRUN_TYPED = "CNN_PARALLEL_HOROVODRUN"  # horovodrun's line as typed (common/install/build_horovod.sh)
LAUNCH_TYPED = "CNN_PARALLEL_LAUNCH"  # the launcher's line as a job script typed it (slurm/job.sh)
SLURM_SUBMIT = "CNN_PARALLEL_SUBMIT"  # how to submit that job again (slurm/job.sh)


def launcher_command() -> list | None:
    """The command line of the outermost launcher (horovodrun, mpirun, srun) among this
    process's ancestors, as typed, without the program it launches; None when the rank was
    started some other way (or the launcher runs on another host). horovodrun turns itself
    into the mpirun line it expands to, but leaves the line it was typed as behind; a Slurm
    job script (slurm/job.sh) hands its own line on, srun's among them (srun's tasks have
    no launcher among their ancestors)."""
    script_typed = shlex.split(os.environ.get(LAUNCH_TYPED, ""))
    if script_typed and os.path.basename(script_typed[0]) in LAUNCHERS:
        return script_typed
    found = None
    for process in ancestors():
        found = launcher_words(list(process.words)) or found
    typed = os.environ.get(HOROVODRUN_TYPED)
    if found and typed:
        return launcher_words(shlex.split(typed))
    return found


def git_commit() -> str | None:
    """The project's commit (with '-dirty' for uncommitted changes), when it is a git checkout."""
    repository = REPOSITORY
    if not os.path.exists(os.path.join(repository, ".git")):
        return None
    try:
        commit = subprocess.run(["git", "-C", repository, "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", repository, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (commit + ("-dirty" if dirty else "")) or None
