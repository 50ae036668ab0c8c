"""Failures: one failing rank brings the whole job down promptly; a kill during
a save never costs a good checkpoint; a non-finite loss stops the run."""

import json
import os
import re
import time

import pytest

from tests.helpers import assert_ok, completed, resumed_after, run_training

LAYOUTS = {"data": ([], 2), "model": (["--mode", "model", "--pp", 2], 2),
           "hybrid": (["--mode", "hybrid", "--pp", 2, "--dp", 2], 4)}
FAILURES = [("torch", "data", "raise"), ("torch", "data", "kill"), ("torch", "model", "raise"),
            ("tf", "hybrid", "raise"), ("tf", "hybrid", "kill")]


@pytest.mark.serial  # a bound on the time the job takes to end
@pytest.mark.parametrize("framework,layout,how", FAILURES)
def test_one_failing_rank_ends_the_job_within_20_seconds_of_its_failure(framework, layout, how):
    """Timed from the failure (the failing rank prints the time just before), not from the
    launch: four TensorFlow ranks on two cores take 20-30 s to start."""
    from common.launch.faults import FAILURE_MARK

    args, np_ = LAYOUTS[layout]
    os.environ["CNN_PARALLEL_TEST_FAILURE"] = f"1:5:{how}"  # rank 1 fails at its 6th step
    try:
        result = run_training(["--epochs", 3, *args], np_=np_, framework=framework, timeout=120)
        ended = time.time()
    finally:
        del os.environ["CNN_PARALLEL_TEST_FAILURE"]
    output = result.stdout + result.stderr
    failed = re.search(rf"{FAILURE_MARK} ([0-9.]+)", output)
    assert result.returncode != 0 and failed, f"exit {result.returncode}\n{output}"
    after = ended - float(failed.group(1))
    assert after < 20, f"ended {after:.0f} s after the failure\n{output}"
    assert result.summary is None  # it never reached the end
    if how == "raise":
        assert "rank 1: crashed" in output and "injected failure on rank 1 at 5" in output, output
    else:
        assert re.search(r"rank 1 .* exited on signal 9", output), output


def training_with(tmp_path, framework, *extra, failure=None):
    if failure:
        os.environ["CNN_PARALLEL_TEST_FAILURE"] = failure
    try:
        return run_training(["--steps-per-epoch", 3, "--checkpoint-dir", tmp_path, *extra], np_=2,
                            framework=framework)
    finally:
        os.environ.pop("CNN_PARALLEL_TEST_FAILURE", None)


@pytest.mark.parametrize("framework", ["torch"])  # the save and its commit are common/core/trainer.py's
def test_a_kill_during_save_keeps_the_previous_checkpoint_and_no_epoch_is_recorded_twice(tmp_path, framework):
    """Killed after epoch 2's metrics record and checkpoint were written, before the checkpoint
    is renamed into place: the resume trains epoch 2 again, and its records appear once."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from common.observe.tensorboard import STEP_LOSS_TAG

    records = ["--metrics-file", tmp_path / "metrics.jsonl", "--tensorboard", tmp_path / "tb", "--log-every", 1]
    assert_ok(training_with(tmp_path, framework, "--epochs", 1, *records))
    killed = training_with(tmp_path, framework, "--epochs", 2, "--resume", *records, failure="0:save:kill")
    assert killed.returncode != 0
    assert sorted(name for name in os.listdir(tmp_path) if name.startswith("ckpt-")) == \
        ["ckpt-epoch0001"]
    resumed = assert_ok(training_with(tmp_path, framework, "--epochs", 3, "--resume", *records))
    summary = completed(resumed)
    assert summary["resumed"] == resumed_after(tmp_path, 1) and summary["epochs_done"] == 3
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]
    # Every event of every start's file, none dropped (TensorBoard by default hides what a restart repeats).
    events = EventAccumulator(str(tmp_path / "tb"), purge_orphaned_data=False)
    events.Reload()
    assert [event.step for event in events.Scalars("train/loss")] == [1, 2, 3]
    assert [event.step for event in events.Scalars(STEP_LOSS_TAG)] == list(range(1, 10))  # 3 steps an epoch


def test_resume_skips_a_damaged_newest_checkpoint_and_says_so(tmp_path):
    assert_ok(training_with(tmp_path, "torch", "--epochs", 1))
    (tmp_path / "ckpt-epoch0002").mkdir()
    (tmp_path / "ckpt-epoch0002" / "shard-000.safetensors").write_bytes(b"damaged by a disk error")
    resumed = assert_ok(training_with(tmp_path, "torch", "--epochs", 2, "--resume"))
    summary = completed(resumed)
    assert summary["skipped_checkpoints"] == [str(tmp_path / "ckpt-epoch0002")]
    assert summary["resumed"] == resumed_after(tmp_path, 1)
    assert f"skipping {tmp_path}/ckpt-epoch0002: it does not load" in resumed.stdout  # and says so


@pytest.mark.parametrize("framework", ["torch"])  # the NaN agreement is common/core/trainer.py's, framework-blind
def test_a_nonfinite_loss_stops_without_saving(tmp_path, framework):
    assert_ok(training_with(tmp_path, framework, "--epochs", 1))
    before = sorted(os.listdir(tmp_path))
    diverged = training_with(tmp_path, framework, "--epochs", 3, "--resume", "--lr", "1e6")
    assert diverged.returncode == 3, diverged.stdout + diverged.stderr
    errors = [line for line in diverged.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and re.search(r"NaN or infinite at epoch 2, step \d", errors[0]), diverged.stderr
    assert "Traceback" not in diverged.stderr
    assert sorted(os.listdir(tmp_path)) == before  # the last good checkpoint is still the newest
    assert diverged.summary["outcome"] == "failed" and diverged.summary["error"] in errors[0]
    assert diverged.summary["epochs_done"] == 1  # the resumed position: nothing after it was kept
    allowed = training_with(tmp_path, framework, "--epochs", 2, "--resume", "--lr", "1e6", "--allow-nonfinite")
    assert completed(allowed)["epochs_done"] == 2
