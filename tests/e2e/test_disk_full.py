"""A full disk loses nothing: a checkpoint, the metrics file or TensorBoard events that
cannot be written stop the job with one line (or, asked to, training goes on), and
what was written before stays whole and loadable.

Each test mounts a small tmpfs of its own (as root) and unmounts it afterwards.
"""

import json
import subprocess

import pytest

from tests.helpers import DIGITS_CNN, assert_ok, checkpoint_path, checkpoint_weights, completed, run_training

SHORT = ["--epochs", 3, "--steps-per-epoch", 2, "--batch-size", 32]
CHECKPOINT_KB = 292  # the digits CNN's weights and momentum (2 x 35,914 float32) in 4 KB pages


@pytest.fixture
def small_disk(tmp_path):
    """make(kb, free_kb): a tmpfs of ``kb`` KB with all but ``free_kb`` of it taken."""
    mounts = []

    def make(kb, free_kb=None):
        where = tmp_path / f"disk{len(mounts)}"
        where.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kb}k", "tmpfs", str(where)], check=True)
        mounts.append(where)
        if free_kb is not None:
            (where / "filler").write_bytes(bytes((kb - free_kb) * 1024))
        return where

    yield make
    for where in mounts:
        subprocess.run(["umount", "-l", str(where)], check=False)


def error_lines(result):
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize("framework,layout", [("torch", ["--mode", "data"]),
                                              ("tf", ["--mode", "model", "--pp", 2, "--microbatches", 2])])
def test_a_checkpoint_that_does_not_fit_stops_the_job_and_keeps_the_last_one(small_disk, framework, layout):
    disk = small_disk(CHECKPOINT_KB + 100)  # the first checkpoint fits, the second does not
    directory = disk / "ckpt"
    result = run_training([*SHORT, *layout, "--checkpoint-dir", directory], np_=2, framework=framework)
    assert result.returncode == 2, result.stdout + result.stderr
    [line] = error_lines(result)
    assert f"could not save checkpoint {checkpoint_path(directory, 2)} (No space left on device; it needs 0.3 MB" \
        in line and f"are free in {directory})" in line and "the previous checkpoints are intact" in line, line
    assert "Traceback" not in result.stderr
    assert sorted(entry.name for entry in directory.iterdir()) == ["ckpt-epoch0001"]  # no partial one left
    assert checkpoint_weights(checkpoint_path(directory, 1), DIGITS_CNN)  # opens and loads, every tensor


def test_keep_going_warns_once_per_save_and_trains_to_the_end(small_disk, tmp_path):
    disk = small_disk(64, free_kb=0)
    result = assert_ok(run_training([*SHORT, "--checkpoint-dir", disk / "ckpt", "--metrics-file", disk / "m.jsonl",
                                     "--keep-going-on-save-error"]))
    warnings = [line for line in result.stdout.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 4, result.stdout  # three checkpoints and the metrics file (then not tried again)
    assert all("--keep-going-on-save-error" in line and "No space left on device" in line for line in warnings)
    assert completed(result)["epochs_done"] == 3
    assert not any(entry.name.startswith("ckpt") for entry in (disk / "ckpt").iterdir())


def test_full_disk_under_the_metrics_and_tensorboard_keeps_their_records_whole(small_disk, tmp_path):
    from tests.e2e.test_observe import read_events

    disk = small_disk(64, free_kb=4)  # one page: the configuration and about two epochs of scalars
    result = run_training(["--epochs", 20, "--steps-per-epoch", 1, "--batch-size", 32, "--log-every", 0,
                           "--tensorboard", disk / "tb", "--metrics-file", tmp_path / "m.jsonl"], framework="tf")
    assert result.returncode == 2, result.stdout + result.stderr
    [line] = error_lines(result)
    assert line.startswith(f"error: cannot write the TensorBoard events {disk / 'tb'}/events.out.tfevents.") and \
        "No space left on device" in line, line
    records = [json.loads(text) for text in (tmp_path / "m.jsonl").read_text().splitlines()]
    logged = read_events(disk / "tb").Scalars("train/loss")  # TensorBoard reads every whole record back
    assert 1 <= len(logged) < 20 and [event.step for event in logged] == [record["epoch"] for record in
                                                                          records[:len(logged)]]
