import os

import numpy as np
import pytest

from common import checkpoint, metrics
from common.errors import UsageError


def write_bytes(content):
    def write(path):
        with open(path, "wb") as handle:
            handle.write(content)
    return write


def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path):
    path = checkpoint.checkpoint_path(str(tmp_path), (1, 0), "pt")
    checkpoint.atomic_save(path, write_bytes(b"good"))

    def crash(temporary):
        write_bytes(b"half")(temporary)
        raise RuntimeError("killed mid-save")

    with pytest.raises(RuntimeError):
        checkpoint.atomic_save(path, crash)
    assert open(path, "rb").read() == b"good"
    assert os.listdir(tmp_path) == ["ckpt-epoch0001.pt"]


def test_list_and_prune_keep_the_newest(tmp_path):
    positions = [(1, 0), (2, 0), (2, 7), (3, 0), (10, 0)]
    for position in positions:
        checkpoint.atomic_save(checkpoint.checkpoint_path(str(tmp_path), position, "pt"), write_bytes(b"x"))
    assert (tmp_path / "ckpt-epoch0002-step000007.pt").exists() and (tmp_path / "ckpt-epoch0003.pt").exists()
    (tmp_path / ".tmp-99-ckpt-epoch0011.pt").write_bytes(b"partial")
    assert [position for position, _ in checkpoint.list_checkpoints(str(tmp_path), "pt")] == positions
    checkpoint.prune(str(tmp_path), "pt", keep=2)
    assert [position for position, _ in checkpoint.list_checkpoints(str(tmp_path), "pt")] == [(3, 0), (10, 0)]


def test_prepare_directory_never_trains_over_a_saved_run(tmp_path):
    directory = str(tmp_path / "run")
    with pytest.raises(UsageError, match="no checkpoint"):
        checkpoint.prepare_directory(directory, "pt", resume=True)
    checkpoint.prepare_directory(directory, "pt", resume=False)
    checkpoint.atomic_save(checkpoint.checkpoint_path(directory, (1, 0), "pt"), write_bytes(b"x"))
    with pytest.raises(UsageError, match="already holds checkpoints; pass --resume"):
        checkpoint.prepare_directory(directory, "pt", resume=False)
    checkpoint.prepare_directory(directory, "pt", resume=True)


def test_unwritable_directory(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(UsageError, match="cannot write checkpoints"):
        checkpoint.prepare_directory(str(blocker / "sub"), "pt", resume=False)


def test_architecture_mismatch_names_both():
    saved = checkpoint.architecture("cnn", (1, 8, 8), 10)
    with pytest.raises(UsageError, match="holds model 'cnn'.*builds 'resnet'"):
        checkpoint.check_architecture(saved, checkpoint.architecture("resnet", (1, 8, 8), 10), "p")


def test_meter_results_are_weighted():
    meter = metrics.Meter()
    meter.add(10.0, 3, 4)
    meter.add(1.0, 1, 1)
    assert metrics.Meter.results(meter.sums) == (pytest.approx(11 / 5), pytest.approx(4 / 5))
    assert all(np.isnan(metrics.Meter.results(np.zeros(3))))
