"""The run directory: where a run's outputs go, and what it records to be repeated."""

import dataclasses
import datetime
import json
import os
import shlex

import pytest

from common.core.config import parse_config
from common.core.errors import UsageError
from common.launch import supervision
from common.observe import run_dir

START = datetime.datetime(2026, 11, 27, 19, 55, 1)


def test_by_default_every_output_goes_into_a_new_directory_named_by_time_framework_and_mode(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = parse_config(["--mode", "model", "--pp", "2", "--timeline"])
    first = run_dir.claim(config, "tf", START)
    second = run_dir.claim(config, "tf", START)  # a second run in the same second
    assert (first, second) == ("runs/20261127-195501-tf-model", "runs/20261127-195501-tf-model-2")
    assert os.path.isdir(first) and os.path.isdir(second)
    paths = run_dir.place_outputs(config, first)
    assert (paths.run_dir, paths.metrics_file, paths.summary_file, paths.tensorboard, paths.checkpoint_dir,
            paths.timeline) == (first, f"{first}/metrics.jsonl", f"{first}/summary.json", first,
                                f"{first}/checkpoints", f"{first}/timeline.json")
    assert config.run_dir == "" and config.timeline == run_dir.TIMELINE_IN_RUN_DIR  # the settings stay as given
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.run_dir = first  # type: ignore[misc]


def test_flags_that_name_a_place_keep_it_and_none_writes_only_what_they_ask(tmp_path):
    config = parse_config(["--run-dir", str(tmp_path / "run"), "--checkpoint-dir", str(tmp_path / "elsewhere"),
                           "--timeline", str(tmp_path / "t.json")])
    paths = run_dir.place_outputs(config, run_dir.claim(config, "torch"))
    assert paths.checkpoint_dir == str(tmp_path / "elsewhere") and paths.timeline == str(tmp_path / "t.json")
    assert paths.metrics_file == str(tmp_path / "run" / "metrics.jsonl")

    nothing = parse_config(["--run-dir", "none"])
    assert run_dir.claim(nothing, "torch") is None
    nowhere = run_dir.place_outputs(nothing, None)
    assert (nowhere.metrics_file, nowhere.summary_file, nowhere.tensorboard, nowhere.checkpoint_dir) == ("",) * 4
    with pytest.raises(UsageError, match="bare --timeline writes into the run directory"):
        run_dir.place_outputs(parse_config(["--run-dir", "none", "--timeline"]), None)


def test_an_unwritable_run_directory_is_one_usage_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(UsageError, match="cannot create the run directory .*choose a writable --run-dir"):
        run_dir.claim(parse_config(["--run-dir", str(blocker / "run")]), "torch")


def test_the_record_repeats_the_run_and_each_start_is_appended(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["train_torch/main.py", "--epochs", "3", "--data-dir", "my data"]
    config = parse_config(argv[1:] + ["--run-dir", "run"])
    paths = run_dir.place_outputs(config, run_dir.claim(config, "torch"))
    run_dir.record("run", config, "torch", 4, argv, START.astimezone(), paths=paths)
    run_dir.record("run", config, "torch", 4, argv + ["--resume"], START.astimezone(), paths=paths)
    script = (tmp_path / "run" / "command.sh").read_text()
    assert os.access(tmp_path / "run" / "command.sh", os.X_OK) and script.startswith("#!/bin/bash")
    commands = [shlex.split(line) for line in script.splitlines() if "main.py" in line]
    assert [words[1:-1] for words in commands] == [argv, argv + ["--resume"]]  # after the interpreter, before "$@"
    assert commands[0][-1] == "$@" and f"cd {tmp_path}" in script
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["world_size"] == 4 and saved["command"] == argv + ["--resume"]
    assert saved["config"]["metrics_file"] == "run/metrics.jsonl" and saved["config"]["data_dir"] == "my data"
    assert parse_config(argv[1:]).epochs == saved["config"]["epochs"]


@pytest.mark.parametrize("words,launcher", [
    (["python3", "/venv/bin/horovodrun", "-np", "2", "python", "main.py"], ["horovodrun", "-np", "2"]),
    (["mpirun", "-np", "4", "--bind-to", "none", "/v/bin/python3.11", "main.py", "--mode", "model"],
     ["mpirun", "-np", "4", "--bind-to", "none"]),
    (["/usr/bin/srun", "--mpi=pmix", "python", "main.py"], ["srun", "--mpi=pmix"]),
    (["bash", "job.sh"], None),
    (["python", "main.py", "mpirun"], None),
])
def test_the_launcher_is_read_from_its_command_line(words, launcher):
    assert supervision.launcher_words(words) == launcher


def test_the_outermost_launcher_among_the_ancestors_is_recorded(tmp_path):
    """A stand-in 'mpirun' starts a stand-in 'srun' that starts the rank: mpirun is recorded."""
    import subprocess
    import sys

    rank = f"import sys; sys.path.insert(0, {os.getcwd()!r}); from common.observe import run_dir; " \
           "print(run_dir.launcher_command())"
    for name, child in (("srun", [sys.executable, "-c", rank]), ("mpirun", [str(tmp_path / "srun"), "-n", "2"])):
        (tmp_path / name).write_text(f"#!{sys.executable}\nimport subprocess, sys\n"
                                     f"sys.exit(subprocess.call({child!r}))\n")
        (tmp_path / name).chmod(0o755)
    seen = subprocess.run([str(tmp_path / "mpirun"), "-np", "2", "--bind-to", "none"], capture_output=True,
                          text=True, check=True).stdout
    assert seen.strip() == str(["mpirun", "-np", "2", "--bind-to", "none"])


def test_horovodruns_typed_line_beats_the_mpirun_line_it_became(monkeypatch):
    """horovodrun execs into `mpirun ... -x VAR ...` and leaves its own line in the environment."""
    class Process:
        words = ("mpirun", "--allow-run-as-root", "-np", "2", "-x", "PATH", "-x", "HOME", "python", "main.py")

    monkeypatch.setattr(run_dir, "ancestors", lambda: [Process()])
    monkeypatch.delenv(run_dir.HOROVODRUN_TYPED, raising=False)
    assert run_dir.launcher_command() == ["mpirun", "--allow-run-as-root", "-np", "2", "-x", "PATH", "-x", "HOME"]
    monkeypatch.setenv(run_dir.HOROVODRUN_TYPED, "horovodrun -np 2 -H 'a:1,b:1' python main.py --epochs 3")
    assert run_dir.launcher_command() == ["horovodrun", "-np", "2", "-H", "a:1,b:1"]
    monkeypatch.setattr(run_dir, "ancestors", lambda: [])  # no launcher at all: a leftover variable is ignored
    assert run_dir.launcher_command() is None


def test_the_recorded_commit_is_the_checkouts():
    import subprocess

    from tests.helpers import REPO

    head = subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert head and run_dir.git_commit().split("-")[0] == head
