"""Curves from metrics files (no MPI)."""

import json
import subprocess
import sys

import pytest
from PIL import Image

from common.core.errors import UsageError
from common.observe import plot
from tests.helpers import REPO


def metrics_file(path, losses, framework="torch", ranks=1):
    with open(path, "w") as out:
        for epoch, loss in enumerate(losses, start=1):
            out.write(json.dumps({"epoch": epoch, "train_loss": loss, "test_loss": loss + 0.1, "train_accuracy": 0.5,
                                  "test_accuracy": 0.4, "framework": framework, "mode": "data",
                                  "world_size": ranks}) + "\n")
        out.write(json.dumps({"epoch": len(losses), "evaluation_only": True, "test_loss": 1.0}) + "\n")
    return str(path)


def test_each_run_is_one_line_in_every_panel_with_its_label(tmp_path):
    runs = [metrics_file(tmp_path / f"{n}.jsonl", [1.0, 0.5, 0.3], ranks=n) for n in (1, 2, 3)]
    drawn = plot.plot_runs(runs, str(tmp_path / "curves.png"))
    assert drawn == {title: 3 for _, title in plot.PANELS}
    with Image.open(tmp_path / "curves.png") as image:
        assert image.format == "PNG" and image.size[0] > 500
    assert plot.describe(plot.read_run(runs[1])) == "torch data, 2 ranks"


def test_unreadable_or_empty_metrics_files_are_named(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(UsageError, match="empty.jsonl holds no epoch records"):
        plot.read_run(str(tmp_path / "empty.jsonl"))
    with pytest.raises(UsageError, match="cannot read metrics file"):
        plot.read_run(str(tmp_path / "missing.jsonl"))


def test_the_tensorboard_writer_loads_no_framework(tmp_path):
    probe = ("import sys; from common.observe.tensorboard import TensorBoardLog; "
             f"log = TensorBoardLog({str(tmp_path)!r}, {{'model': 'cnn'}}); log.epoch({{'epoch': 1, 'lr': 0.1}}); "
             "log.step_loss(3, 2.0); log.close(); print(sorted({'torch', 'tensorflow'} & set(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
