"""Ray as a launcher: python -m common.launch.ray runs the entry script in Horovod workers
that are Ray actors (horovod.ray.RayExecutor over Gloo), on a Ray instance it starts here
(2 CPUs, no dashboard, usage statistics off)."""

import json
import subprocess

from tests.helpers import (
    DIGITS_CNN,
    PYTHON,
    QUIET,
    REPO,
    assert_ok,
    checkpoint_path,
    checkpoint_weights,
    job_env,
    relative_difference,
    run_training,
)

ARGS = ["--epochs", 1, "--steps-per-epoch", 3, "--lr", 0.1, "--momentum", 0.9, "--batch-size", 63, "--threads", 1]


def test_two_ray_workers_equal_one_process(tmp_path):
    """63 samples split 32/31 over two Ray workers: ≡ one process (without Horovod's
    allreduce between the actors each would step on its own half)."""
    command = [PYTHON, "-m", "common.launch.ray", "-np", "2", "train_torch/main.py", *QUIET,
               *map(str, ARGS), "--checkpoint-dir", str(tmp_path / "ray"), "--summary-file", str(tmp_path / "s.json")]
    result = assert_ok(subprocess.run(command, cwd=REPO, env=job_env(), capture_output=True, text=True,
                                      timeout=300))
    summary = json.loads((tmp_path / "s.json").read_text())
    assert (summary["outcome"], summary["mode"], summary["world_size"]) == ("completed", "data", 2), result.stdout
    assert_ok(run_training([*ARGS, "--checkpoint-dir", tmp_path / "single"]))
    single = checkpoint_weights(checkpoint_path(tmp_path / "single", 1), DIGITS_CNN)
    on_ray = checkpoint_weights(checkpoint_path(tmp_path / "ray", 1), DIGITS_CNN)
    for name, value in single.items():
        assert relative_difference(on_ray[name], value) <= 1e-6, name


def test_a_failing_worker_fails_the_launch(tmp_path):
    """A rank that raises at its second step: the launch exits non-zero, it does not hang."""
    command = [PYTHON, "-m", "common.launch.ray", "-np", "2", "train_torch/main.py", *QUIET, *map(str, ARGS)]
    result = subprocess.run(command, cwd=REPO, env=dict(job_env(), CNN_PARALLEL_TEST_FAILURE="1:1:raise"),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0, result.stdout + result.stderr
    assert "injected failure" in result.stdout + result.stderr
