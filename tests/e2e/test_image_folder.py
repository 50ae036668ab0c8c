"""End to end on real images (ELPV solar cells) streamed from a class folder, both frameworks."""

import json
import math
import os
import pathlib
import shutil
import time

import pytest

from tests.e2e.test_bad_input import assert_one_line_error, snapshot
from tests.helpers import (
    FRAMEWORKS,
    assert_ok,
    checkpoint_path,
    checkpoint_weights,
    completed,
    final_accuracy,
    folder_args,
    folder_cnn,
    relative_difference,
    run_training,
)
from tests.unit.test_images import png_claiming

OTHER = {"torch": "tf", "tf": "torch"}


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_two_ranks_train_a_resnet_on_real_images_and_the_other_framework_scores_it_alike(
        tmp_path, elpv_small, framework):
    metrics_file = tmp_path / "metrics.jsonl"
    result = assert_ok(run_training(["--model", "resnet8", *folder_args(elpv_small, 32), "--epochs", 3,
                                     "--batch-size", 16, "--metrics-file", metrics_file,
                                     "--checkpoint-dir", tmp_path / "run"],
                                    np_=2, launcher="horovodrun", framework=framework))
    summary = completed(result)
    assert summary["decoder_processes"] == [1, 1] and not summary["decode_on_device"]
    assert (summary["dataset"], summary["train_samples"], summary["test_samples"]) == ("folder", 64, 16)
    assert summary["image_shape"] == [1, 32, 32]
    records = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    assert [record["epoch"] for record in records] == [1, 2, 3]
    assert all(0 <= record["data_wait_fraction"] < 1 for record in records)
    assert "data wait" in next(line for line in result.stdout.splitlines() if "epoch 3/3" in line)
    assert records[-1]["train_loss"] < math.log(2) - 0.03  # it learns from the pixels (chance: ln 2)

    evaluated = assert_ok(run_training([*folder_args(elpv_small, 32), "--model", "resnet8", "--epochs", 0,
                                        "--init-from", checkpoint_path(tmp_path / "run", 3)],
                                       framework=OTHER[framework]))
    assert final_accuracy(evaluated) == pytest.approx(summary["test_accuracy"], abs=1e-9)


def test_both_frameworks_take_the_same_steps_on_the_same_augmented_images(tmp_path, elpv_small):
    args = [*folder_args(elpv_small), "--epochs", 1, "--steps-per-epoch", 3, "--batch-size", 16,
            "--momentum", 0, "--lr", 0.1]
    ends = {}
    for framework in FRAMEWORKS:
        assert_ok(run_training([*args, "--checkpoint-dir", tmp_path / framework], framework=framework))
        ends[framework] = checkpoint_weights(checkpoint_path(tmp_path / framework, 1), folder_cnn())
    for key, value in ends["torch"].items():
        assert relative_difference(ends["tf"][key], value) <= 1e-5, key


def copy_of(elpv_small, tmp_path):
    root = tmp_path / "images"
    shutil.copytree(elpv_small, root)
    return root


def truncate(path):
    content = path.read_bytes()
    path.write_bytes(content[:len(content) // 3])


def bad_file(root, case):
    first = sorted((root / "defective").iterdir())[0]
    if case == "not an image":
        first.write_text("<html>404</html>")
    elif case == "truncated":
        truncate(first)
    elif case == "unreadable":
        first.unlink()
        first.symlink_to(root / "missing.png")
    elif case == "decompression bomb":
        first.write_bytes(png_claiming(40000, 40000))
    return first


def layout_problem(root, case):
    if case == "empty directory":
        for child in root.iterdir():
            shutil.rmtree(child)
    elif case == "class without images":
        (root / "unlabelled").mkdir()
        return root / "unlabelled"
    elif case == "train and val differ":
        (root / "train").mkdir()
        for name in ("defective", "functional"):
            shutil.move(root / name, root / "train" / name)
        shutil.copytree(root / "train" / "defective", root / "val" / "defective")
        shutil.copytree(root / "train" / "functional", root / "val" / "cracked")
        return root / "train"
    return root


FILE_CASES = ("not an image", "truncated", "unreadable", "decompression bomb")
LAYOUT_CASES = {"missing directory": "not found", "empty directory": "has no class folders",
                "class without images": "holds no images", "train and val differ": "hold different classes"}


@pytest.mark.parametrize("case", [*FILE_CASES, *LAYOUT_CASES, "image size too small"])
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_bad_image_folders_end_with_one_line_before_training(tmp_path, elpv_small, framework, case):
    root = copy_of(elpv_small, tmp_path)
    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / "keep.txt").write_text("an earlier run's file")
    before = snapshot(saved)
    args = [*folder_args(root), "--epochs", 1, "--metrics-file", saved / "metrics.jsonl"]
    if case in FILE_CASES:
        pattern = f"{bad_file(root, case)} is not a readable image"
    elif case == "missing directory":
        args, pattern = [*folder_args(tmp_path / "nowhere"), "--epochs", 1], LAYOUT_CASES[case]
    elif case == "image size too small":
        args, pattern = [*args, "--model", "vgg11", "--image-size", 16], "pass a larger --image-size"
    else:
        pattern = f"{layout_problem(root, case)}.* {LAYOUT_CASES[case]}"
    result = run_training(args, framework=framework)
    assert_one_line_error(result, pattern)
    assert result.summary is None  # it ended before training
    assert snapshot(saved) == before


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_an_image_that_breaks_after_the_check_stops_every_rank_with_its_path(tmp_path, elpv_small, framework):
    root = copy_of(elpv_small, tmp_path)
    broken = sorted((root / "functional").iterdir())[-1]
    truncate(broken)  # the header still reads: only decoding its pixels fails
    started = time.monotonic()
    result = run_training([*folder_args(root), "--check-images", "header", "--epochs", 2, "--batch-size", 16],
                          np_=2, framework=framework, timeout=120)
    assert result.returncode != 0 and time.monotonic() - started < 60
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and f"{broken} is not a readable image" in errors[0], result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_skip_bad_images_trains_on_and_counts_them(tmp_path, elpv_small):
    root = copy_of(elpv_small, tmp_path)
    broken = sorted((root / "defective").iterdir())[0]
    truncate(broken)
    metrics_file = tmp_path / "metrics.jsonl"
    result = assert_ok(run_training([*folder_args(root), "--check-images", "header", "--skip-bad-images",
                                     "--epochs", 2, "--batch-size", 16, "--metrics-file", metrics_file], np_=2))
    skipped = [line for line in result.stdout.splitlines() if "skipped unreadable image" in line]
    # Read once per epoch when it is a training image, once per evaluation when it is held out.
    assert len(skipped) == 2 and all(str(broken) in line for line in skipped)
    assert completed(result)["epochs_done"] == 2
    assert os.path.exists(broken)
    # Each epoch's record counts it where it was left out (training or evaluation), and so does its line.
    counts = [json.loads(line)["blank_images"] for line in metrics_file.read_text().splitlines()]
    assert [count["train"] + count["test"] for count in counts] == [1, 1]
    assert sum("unreadable images left out: " in line for line in result.stdout.splitlines()) == 2


def test_an_unreadable_training_image_carries_no_loss_in_data_and_pipeline_modes(tmp_path, elpv_small):
    """A training image broken after the check, --skip-bad-images: data mode on 2 ranks and a
    2-stage pipeline end at the same weights. The pipeline's last stage scores labels without
    reading images: without its first stage's word of which samples it left blank, the blank
    image's loss would move the weights (by about 1e-3; tests/unit/test_stages.py shows a blank
    sample's loss is left out of a stage's step)."""
    from common.data import folders

    root = copy_of(elpv_small, tmp_path)
    broken = folders.scan_folder(str(root), 0.2).train.paths[0]  # the default --val-fraction's split
    truncate(pathlib.Path(broken))
    args = [*folder_args(root), "--check-images", "header", "--skip-bad-images", "--epochs", 1, "--batch-size", 16]
    weights, counts = {}, {}
    for name, layout in (("data", []), ("pipeline", ["--mode", "model", "--pp", 2])):
        directory, metrics_file = tmp_path / name, tmp_path / f"{name}.jsonl"
        assert_ok(run_training([*args, *layout, "--checkpoint-dir", directory, "--metrics-file", metrics_file],
                               np_=2))
        weights[name] = checkpoint_weights(checkpoint_path(directory, 1), folder_cnn())
        counts[name] = json.loads(metrics_file.read_text())["blank_images"]
    assert counts == {"data": {"train": 1, "test": 0}, "pipeline": {"train": 1, "test": 0}}
    for key, value in weights["data"].items():
        assert relative_difference(weights["pipeline"][key], value) <= 1e-5, key


def test_only_the_ranks_that_read_images_keep_decoder_processes(elpv_small):
    """A 2-stage pipeline on an image folder: both ranks check their share of the files with
    their decoders at start-up; then only stage 0 reads images, and only it keeps them."""
    result = run_training([*folder_args(elpv_small), "--data-workers", 1, "--epochs", 1, "--steps-per-epoch", 2,
                           "--batch-size", 16, "--mode", "model", "--pp", 2], np_=2)
    assert completed(result)["decoder_processes"] == [1, 0]
