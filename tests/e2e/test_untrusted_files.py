"""Files users point us at never run code: for every such path (--init-from, a
checkpoint found by --resume, a dataset under --data-dir) a file whose
unpickling would create a marker file is refused with one line, exit 2, and
the marker never appears."""

import json
import os
import pickle

import pytest

from tests.e2e.test_bad_input import assert_one_line_error
from tests.helpers import FRAMEWORKS, assert_ok, completed, resumed_after, run_training
from tests.unit.test_data import write_cifar_dir


class CreatesMarker:
    """Unpickling this runs ``touch marker`` (what a crafted file would do)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def payload(marker):
    return pickle.dumps({"model": CreatesMarker(marker)}, protocol=2)


def test_the_payload_does_run_when_unpickled(tmp_path):
    # The files below would run code if anything unpickled them.
    pickle.loads(payload(tmp_path / "marker"))
    assert (tmp_path / "marker").exists()


def old_style_checkpoint(tmp_path, marker):
    """A pickle under the name earlier versions wrote (torch.save)."""
    path = tmp_path / "ckpt-epoch0001.pt"
    path.write_bytes(payload(marker))
    return ["--init-from", path]


def pickled_shard_via_init_from(tmp_path, marker):
    """A checkpoint directory whose sound meta.json points at a pickled shard."""
    path = tmp_path / "ckpt-epoch0001"
    path.mkdir()
    (path / "meta.json").write_text(json.dumps({
        "format": "cnn-parallel/2", "epoch": 1, "step": 0, "shards": 1, "optimizer": "sgd",
        "architecture": {"model": "cnn", "input_shape": [1, 8, 8], "num_classes": 10}}))
    (path / "shard-000.safetensors").write_bytes(payload(marker))
    (path / "COMPLETE").write_text("{}")
    return ["--init-from", path]


def pickled_shard_via_resume(tmp_path, marker):
    pickled_shard_via_init_from(tmp_path, marker)
    return ["--checkpoint-dir", tmp_path, "--resume"]


def pickled_cifar_batch(tmp_path, marker):
    write_cifar_dir(tmp_path)
    (tmp_path / "data_batch_1").write_bytes(payload(marker))
    return ["--dataset", "cifar10", "--data-dir", tmp_path]


CASES = {
    "--init-from an old .pt pickle": (old_style_checkpoint, "cannot load checkpoint .*ckpt-epoch0001.pt "
                                                            r"\(not a cnn-parallel/2 checkpoint directory"),
    "--init-from a pickled shard": (pickled_shard_via_init_from, "cannot load checkpoint .*ckpt-epoch0001 "),
    "--resume finds a pickled shard": (pickled_shard_via_resume, "cannot load checkpoint .*ckpt-epoch0001 "),
    "--data-dir with a pickled batch": (pickled_cifar_batch, r"cannot read .*data_batch_1 .*posix\.system"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_crafted_file_is_refused_without_running_it(tmp_path, case):
    make_args, pattern = CASES[case]
    marker = tmp_path / "marker"
    data = tmp_path / "data"
    data.mkdir()
    result = run_training(["--epochs", 1, *make_args(data, marker)])
    assert_one_line_error(result, pattern)
    assert not marker.exists(), "loading the file ran its code"


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_a_crafted_file_among_good_checkpoints_is_skipped_on_resume(tmp_path, framework):
    """The newest checkpoint replaced by a crafted one: resume skips it, never runs it."""
    assert_ok(run_training(["--epochs", 2, "--steps-per-epoch", 1, "--checkpoint-dir", tmp_path],
                           framework=framework))
    marker = tmp_path.parent / f"marker-{framework}"
    newest = tmp_path / "ckpt-epoch0002"
    (newest / "shard-000.safetensors").write_bytes(payload(marker))
    resumed = assert_ok(run_training(["--epochs", 3, "--steps-per-epoch", 1, "--checkpoint-dir", tmp_path,
                                      "--resume"], framework=framework))
    summary = completed(resumed)
    assert summary["skipped_checkpoints"] == [str(newest)]
    assert summary["resumed"] == resumed_after(tmp_path, 1)
    assert not marker.exists()
