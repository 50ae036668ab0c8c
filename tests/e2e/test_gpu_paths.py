"""The GPU paths run end to end on a CPU: decoding JPEGs on the device (--decode gpu, with
Pillow standing in for nvJPEG here), the flags TensorFlow refuses in one line, and the
prepared GPU check's dry run (benchmarks/gpu_check.py), which says what it skips."""

import json
import os
import subprocess

import numpy as np
import pytest

from tests.e2e.test_bad_input import assert_one_line_error
from tests.helpers import (
    PYTHON,
    REPO,
    assert_ok,
    checkpoint_path,
    checkpoint_weights,
    completed,
    job_env,
    run_training,
)

CNN = {"model": "cnn", "input_shape": [3, 32, 32], "num_classes": 2}


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    from tests.unit.test_jpeg import photo_tree

    return photo_tree(tmp_path_factory.mktemp("photos"), 12, 120, 90, 8)


def folder(photos, *extra):
    return ["--dataset", "folder", "--data-dir", photos, "--image-size", 32, "--model", "cnn", "--epochs", 1,
            "--steps-per-epoch", 3, "--batch-size", 8, "--data-workers", 0, *extra]


def trained(tmp_path, name, args):
    result = assert_ok(run_training([*args, "--checkpoint-dir", tmp_path / name]))
    weights = checkpoint_weights(checkpoint_path(tmp_path / name, 1), CNN)
    return result, np.concatenate([weights[key].ravel() for key in sorted(weights)])


def test_decoding_on_the_device_trains_on_the_crops_the_cpu_path_makes(tmp_path, photos):
    """Three steps on crops decoded by the CPU path and by the device path end at nearly the
    same weights (the pixels differ by about a level); the same images centre-cropped
    instead (another crop, the same order and initial weights) end far from both."""
    on_cpu, cpu = trained(tmp_path, "cpu", folder(photos, "--decode", "cpu"))
    on_device, device = trained(tmp_path, "gpu", folder(photos, "--decode", "gpu"))
    assert "--decode gpu: JPEGs decoded by" in on_device.stdout and "--decode gpu" not in on_cpu.stdout
    assert completed(on_device)["decode_on_device"] and not completed(on_cpu)["decode_on_device"]
    _, centred = trained(tmp_path, "centred", folder(photos, "--decode", "gpu", "--no-augment"))
    _, start = trained(tmp_path, "start", folder(photos, "--lr", 1e-12))  # the initial weights
    learned, apart = np.linalg.norm(cpu - start), np.linalg.norm(device - cpu)
    # (the CPU path decodes large crops at a reduced JPEG scale: a level or two apart on those)
    assert apart < 0.5 * learned and apart < 0.35 * np.linalg.norm(centred - cpu)


def test_tensorflow_says_in_one_line_what_is_pytorchs(tmp_path, photos):
    assert_one_line_error(run_training(folder(photos, "--decode", "gpu"), framework="tf"), "--decode gpu is PyTorch's")
    result = run_training(["--mode", "model", "--pp", 2, "--p2p-memory", "device"], np_=2, framework="tf")
    assert result.returncode == 2 and "Traceback" not in result.stderr + result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "--p2p-memory device" in errors[0], result.stderr


def test_decode_gpu_is_for_image_folders():
    assert_one_line_error(run_training(["--decode", "gpu"]), "--decode gpu decodes image files")


def test_the_gpu_check_runs_dry_on_a_cpu_and_says_what_it_skips(tmp_path):
    result = subprocess.run([PYTHON, os.path.join(REPO, "benchmarks", "gpu_check.py"), "--out", str(tmp_path),
                             "--dry-run"], cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["machine"]["cuda"] is False
    sections = {section["name"]: section for section in report["sections"]}
    assert sections["single process"]["skipped"].startswith("no CUDA device")
    for name in ("single process", "JPEG folder", "pipeline on one GPU", "Horovod with NCCL"):
        assert name in sections
    # the dry run still ran each command line the check would run, for one step on the CPU
    assert all(case["ok"] for section in report["sections"] for case in section["dry_run"]), report
    assert (tmp_path / "gpu_check.md").read_text().count("skipped") >= 1
