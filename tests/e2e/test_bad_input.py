"""Bad input, both frameworks: one line naming the problem and the fix, exit code 2,
no traceback, nothing already saved overwritten."""

import hashlib
import os
import re

import pytest

from tests.helpers import FRAMEWORKS, assert_ok, run_training
from tests.unit.test_data import write_cifar_dir


def fake_checkpoint(directory, framework, content):
    """A checkpoint directory whose meta.json holds ``content`` (marked complete)."""
    path = directory / "ckpt-epoch0001"
    path.mkdir()
    (path / "meta.json").write_bytes(content)
    (path / "COMPLETE").write_text("{}")
    return path


def corrupt_cifar(tmp_path, framework):
    write_cifar_dir(tmp_path)
    (tmp_path / "data_batch_4").write_bytes(b"\x80\x04garbage")
    return ["--dataset", "cifar10", "--data-dir", tmp_path]


def garbage_checkpoint(tmp_path, framework):
    fake_checkpoint(tmp_path, framework, b"truncated")
    return ["--checkpoint-dir", tmp_path, "--resume"]


def existing_run_without_resume(tmp_path, framework):
    fake_checkpoint(tmp_path, framework, b"a saved epoch")
    return ["--checkpoint-dir", tmp_path]


def unwritable_checkpoint_dir(tmp_path, framework):
    (tmp_path / "a-file").write_text("")
    return ["--checkpoint-dir", tmp_path / "a-file" / "ckpts"]


def garbage_init_from(tmp_path, framework):
    return ["--init-from", fake_checkpoint(tmp_path, framework, b"\x00\x01")]


CASES = {
    "missing dataset dir": (lambda p, f: ["--dataset", "cifar10", "--data-dir", p / "nope"],
                            "cifar10: directory .* not found; download"),
    "corrupt cifar file": (corrupt_cifar, "cannot read .*data_batch_4"),
    "unknown model": (lambda p, f: ["--model", "vgg19"], "invalid choice: 'vgg19'"),
    "unknown dataset": (lambda p, f: ["--dataset", "imagenet"], "invalid choice: 'imagenet'"),
    "unknown flag": (lambda p, f: ["--learning-rate", "0.1"], "unrecognized arguments: --learning-rate"),
    "negative epochs": (lambda p, f: ["--epochs", "-3"], "--epochs must not be negative"),
    "images too small": (lambda p, f: ["--dataset", "synthetic", "--synthetic-shape", "1,2,2"], "too small"),
    "unreadable checkpoint": (garbage_checkpoint, "cannot load checkpoint .*ckpt-epoch0001"),
    "checkpoints exist, no --resume": (existing_run_without_resume, "already holds checkpoints; pass --resume"),
    "unwritable checkpoint dir": (unwritable_checkpoint_dir, "cannot write checkpoints"),
    "missing --init-from": (lambda p, f: ["--init-from", p / "nope.pt"], "--init-from: .* does not exist"),
    "unreadable --init-from": (garbage_init_from, "cannot load checkpoint .*ckpt-epoch0001"),
}


def snapshot(directory):
    return {os.path.join(root, name): hashlib.sha256(open(os.path.join(root, name), "rb").read()).hexdigest()
            for root, _, names in os.walk(directory) for name in names}


def assert_one_line_error(result, pattern):
    assert result.returncode == 2, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert re.search(pattern, lines[0]), lines[0]


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_bad_input_single_process(tmp_path, framework, case):
    make_args, pattern = CASES[case]
    args = make_args(tmp_path, framework)
    before = snapshot(tmp_path)
    assert_one_line_error(run_training(["--epochs", 1, *args], framework=framework), pattern)
    assert snapshot(tmp_path) == before, "bad input changed files already saved"


# The architecture check is common/model/checkpoint.py's, before any framework tensor: each framework
# meets it through one of the two flags.
@pytest.mark.parametrize("framework,flag", [("torch", "--resume"), ("tf", "--init-from")])
def test_wrong_architecture_checkpoint_is_refused_and_kept(tmp_path, framework, flag):
    assert_ok(run_training(["--epochs", 1, "--steps-per-epoch", 1, "--checkpoint-dir", tmp_path],
                           framework=framework))
    before = snapshot(tmp_path)
    target = [] if flag == "--resume" else [tmp_path / "ckpt-epoch0001"]
    directory = ["--checkpoint-dir", tmp_path] if flag == "--resume" else []
    result = run_training(["--epochs", 2, "--model", "resnet", *directory, flag, *target], framework=framework)
    assert_one_line_error(result, "holds model 'cnn' .* but this run builds model 'resnet8'")
    assert snapshot(tmp_path) == before


TWO_RANK_CASES = [(["--batch-size", "1"], "global batch 1 is smaller than the 2 ranks"),
                  (["--resume", "--checkpoint-dir", "{tmp}"], "--resume: no checkpoint")]
TENSORBOARD_CASE = (["--tensorboard", "{tmp}/a-file/tb"],
                    "cannot write TensorBoard events to .*a-file/tb .Not a directory.; choose a writable --tensorboard")


# The TensorBoard directory is the trainer's, framework-blind: PyTorch alone.
@pytest.mark.parametrize("framework,args,pattern", [(framework, *case) for framework in FRAMEWORKS
                                                    for case in TWO_RANK_CASES] + [("torch", *TENSORBOARD_CASE)])
def test_bad_input_on_two_ranks_ends_the_job_with_one_line(tmp_path, framework, args, pattern):
    args = [arg.format(tmp=tmp_path) for arg in args]
    (tmp_path / "a-file").write_text("")
    result = run_training(["--epochs", 1, *args], np_=2, framework=framework)
    assert result.returncode == 2, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stderr + result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and re.search(pattern, errors[0]), result.stderr
