"""What a run shows: TensorBoard events with the same tags in both frameworks and modes,
curves overlaid from metrics files, evaluation-only runs recorded."""

import json
import subprocess

import numpy as np
import pytest
from PIL import Image

from common.observe import plot
from common.observe.tensorboard import CONFIG_TAG, EPOCH_TAGS, STEP_LOSS_TAG
from tests.helpers import REPO, assert_ok, checkpoint_path, job_env, run_training


def read_events(directory):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(directory))
    accumulator.Reload()
    return accumulator


def test_torch_ranks_and_a_tf_pipeline_log_the_same_tags_and_their_curves_overlay(tmp_path):
    runs = {"torch": (["--checkpoint-dir", tmp_path / "ckpt"], 2, "torch"),
            "tf": (["--mode", "model", "--pp", 2, "--microbatches", 2], 2, "tf")}
    tags = {}
    for name, (layout, np_, framework) in runs.items():
        assert_ok(run_training(["--epochs", 2, "--steps-per-epoch", 6, "--batch-size", 32, *layout,
                                "--tensorboard", tmp_path / f"tb-{name}", "--log-every", 3,
                                "--metrics-file", tmp_path / f"{name}.jsonl"], np_=np_, framework=framework))
        events = read_events(tmp_path / f"tb-{name}")
        records = [json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
        tags[name] = set(events.Tags()["scalars"])
        for key, tag in EPOCH_TAGS.items():
            logged = [(event.step, event.value) for event in events.Scalars(tag)]
            assert logged == [(record["epoch"], pytest.approx(record[key], rel=1e-6)) for record in records], tag
        step_losses = events.Scalars(STEP_LOSS_TAG)
        assert [event.step for event in step_losses] == [3, 6, 9, 12]
        assert all(0 < event.value < 5 for event in step_losses)
        assert CONFIG_TAG in " ".join(events.Tags()["tensors"])  # the configuration as text
    assert tags["torch"] == tags["tf"] == {*EPOCH_TAGS.values(), STEP_LOSS_TAG}

    # The same 12 steps on the same batches: the curves coincide, one line each.
    drawn = plot.plot_runs([str(tmp_path / "torch.jsonl"), str(tmp_path / "tf.jsonl")], str(tmp_path / "c.png"))
    assert set(drawn.values()) == {2}
    with Image.open(tmp_path / "c.png") as image:
        image.verify()
    torch_loss = [json.loads(line)["train_loss"] for line in (tmp_path / "torch.jsonl").read_text().splitlines()]
    tf_loss = [json.loads(line)["train_loss"] for line in (tmp_path / "tf.jsonl").read_text().splitlines()]
    assert np.allclose(torch_loss, tf_loss, rtol=1e-4)

    # Evaluating the checkpoint is recorded like an epoch, in the file and in TensorBoard.
    result = assert_ok(run_training(["--epochs", 0, "--init-from", checkpoint_path(tmp_path / "ckpt", 2),
                                     "--metrics-file", tmp_path / "eval.jsonl", "--tensorboard", tmp_path / "tb-eval"],
                                    framework="tf"))
    record = json.loads((tmp_path / "eval.jsonl").read_text())
    assert record["evaluation_only"] and record["epoch"] == 0
    assert f"final test accuracy: {record['test_accuracy']:.4f}" in result.stdout
    logged = read_events(tmp_path / "tb-eval").Scalars("test/accuracy")
    assert [(event.step, event.value) for event in logged] == [(0, pytest.approx(record["test_accuracy"]))]


def on_terminal(command, timeout=180):
    """Run ``command`` with a pseudo-terminal as its controlling terminal, stdout and stderr
    (what a user at a terminal sees); (exit code, everything it printed)."""
    import fcntl
    import os
    import pty
    import struct
    import termios
    import time

    pid, master = pty.fork()
    if pid == 0:  # the child: the terminal is already its stdio and controlling terminal
        fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))  # a new pty is 0 x 0
        os.chdir(REPO)
        os.execvpe(command[0], command, job_env())
    output, deadline = b"", time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        output += chunk
    _, status = os.waitpid(pid, 0)
    os.close(master)
    return os.waitstatus_to_exitcode(status), output.decode(errors="replace")


@pytest.mark.parametrize("launch", ["one process", "horovodrun -np 2"])
def test_one_clean_bar_on_a_terminal_and_none_in_a_pipe(launch):
    from tests.helpers import ENTRY, launch_command

    args = ["--epochs", 2, "--batch-size", 32, "--model", "resnet8", "--dataset", "synthetic", "--synthetic-shape",
            "3,32,32", "--synthetic-samples", 512]  # about 1 s per epoch: several redraws
    command = [*launch_command(None if launch == "one process" else 2, "horovodrun"), ENTRY["torch"],
               "--run-dir", "none", *map(str, args)]
    code, seen = on_terminal(command)
    assert code == 0, seen
    bar_updates = [part for part in seen.split("\r") if "step" in part and "img/s" in part]
    assert bar_updates and all("epoch " in part and "loss " in part for part in bar_updates), seen
    assert not any("<stdout>" in part or "[1," in part for part in bar_updates)  # no launcher tags inside
    assert "epoch 2/2  train loss" in seen and "final test accuracy" in seen

    if launch != "one process":
        return  # in a pipe the launcher changes nothing: no terminal, no bar
    piped = subprocess.run(command, cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=180)
    assert piped.returncode == 0
    assert "\r" not in piped.stdout + piped.stderr and "img/s]" not in piped.stderr
    assert "epoch 2/2  train loss" in piped.stdout


def test_a_run_directory_collects_one_run_and_repeats_it(tmp_path):
    """By default a run writes everything into runs/<time>-<framework>-<mode>; its command.sh
    repeats it (the same curve), and --resume --run-dir continues it in place."""
    import re

    from tests.helpers import ENTRY, launch_command

    args = ["--mode", "model", "--pp", 2, "--microbatches", 2, "--epochs", 2, "--steps-per-epoch", 3,
            "--batch-size", 32, "--timeline", "--timeline-steps", 1, "--no-progress"]
    first = assert_ok(subprocess.run([*launch_command(2, "mpirun"), ENTRY["torch"], *map(str, args)], cwd=tmp_path,
                                     env=job_env(), capture_output=True, text=True, timeout=300))
    [name] = [entry.name for entry in (tmp_path / "runs").iterdir()]
    assert re.fullmatch(r"\d{8}-\d{6}-torch-model", name) and f"run directory: runs/{name}" in first.stdout
    run = tmp_path / "runs" / name
    assert {"command.sh", "config.json", "metrics.jsonl", "summary.json", "timeline.json"} <= \
        {entry.name for entry in run.iterdir()}
    assert (checkpoint_path(run / "checkpoints", 2) / "COMPLETE").exists()
    assert set(read_events(run).Tags()["scalars"]) >= set(EPOCH_TAGS.values())
    config = json.loads((run / "config.json").read_text())
    assert config["world_size"] == 2 and config["launcher"][0] == "mpirun"
    assert config["config"]["checkpoint_dir"] == f"runs/{name}/checkpoints"

    assert_ok(subprocess.run(["bash", str(run / "command.sh"), "--run-dir", str(tmp_path / "again")], cwd=REPO,
                             env=job_env(), capture_output=True, text=True, timeout=300))
    assert_ok(subprocess.run([*launch_command(2, "mpirun"), ENTRY["torch"], "--config", str(run / "config.toml"),
                              "--run-dir", str(tmp_path / "from_toml")], cwd=tmp_path, env=job_env(),
                             capture_output=True, text=True, timeout=300))
    losses = [[json.loads(line)["train_loss"] for line in (directory / "metrics.jsonl").read_text().splitlines()]
              for directory in (run, tmp_path / "again", tmp_path / "from_toml")]
    assert len(losses[0]) == 2 and losses[0] == losses[1] == losses[2]  # the same run, three times

    resumed = subprocess.run([*launch_command(2, "mpirun"), ENTRY["torch"], *map(str, args), "--epochs", "3",
                              "--resume", "--run-dir", f"runs/{name}"], cwd=tmp_path, env=job_env(),
                             capture_output=True, text=True, timeout=300)
    assert_ok(resumed)
    summary = json.loads((run / "summary.json").read_text())  # this start's
    assert summary["resumed"]["path"] == f"runs/{name}/checkpoints/ckpt-epoch0002" and summary["epochs_done"] == 3
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert (run / "command.sh").read_text().count("main.py") == 2  # each start of the run, in order
    assert (tmp_path / "runs").exists() and len(list((tmp_path / "runs").iterdir())) == 1
