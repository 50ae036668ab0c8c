"""TensorBoard events for a run, identical tags in both frameworks, written by the
rank that owns the metrics (tensorboardX's writer: protobuf and numpy, no framework).

Tags (the x axis is the epoch, except ``train/step_loss``'s, the optimizer step):
    train/loss  train/accuracy  test/loss  test/accuracy  lr
    throughput/images_per_sec  time/step_seconds  time/data_wait_fraction
    train/step_loss   (every --log-every steps: the global batch's mean loss)
and the resolved configuration as the text ``config``.
"""

from __future__ import annotations

import json
import sys
from typing import Optional

EPOCH_TAGS = {"train_loss": "train/loss", "train_accuracy": "train/accuracy", "test_loss": "test/loss",
              "test_accuracy": "test/accuracy", "lr": "lr", "images_per_sec": "throughput/images_per_sec",
              "step_seconds": "time/step_seconds", "data_wait_fraction": "time/data_wait_fraction"}
STEP_LOSS_TAG = "train/step_loss"
CONFIG_TAG = "config"


def _summary_writer_class():
    """tensorboardX's SummaryWriter, imported without the framework it would otherwise load
    to accept its tensors (torch, 2 s and hundreds of MB, in a TensorFlow rank)."""
    blocked = [name for name in ("torch",) if name not in sys.modules]
    for name in blocked:
        sys.modules[name] = None  # makes `import torch` raise ImportError, which tensorboardX expects
    try:
        from tensorboardX import SummaryWriter
    finally:
        for name in blocked:
            del sys.modules[name]
    return SummaryWriter


class TensorBoardLog:
    """Scalars per epoch and per logged step, and the configuration once."""

    def __init__(self, directory: str, config: dict, command: Optional[list] = None):
        self.writer = _summary_writer_class()(directory, flush_secs=10)
        text = "    " + json.dumps(config, indent=1, sort_keys=True).replace("\n", "\n    ")  # markdown code
        if command:
            text = "    " + " ".join(command) + "\n\n" + text
        self.writer.add_text(CONFIG_TAG, text, 0)

    def epoch(self, record: dict) -> None:
        for key, tag in EPOCH_TAGS.items():
            if record.get(key) is not None:
                self.writer.add_scalar(tag, float(record[key]), int(record["epoch"]))
        self.writer.flush()

    def step_loss(self, step: int, loss: float) -> None:
        self.writer.add_scalar(STEP_LOSS_TAG, float(loss), int(step))

    def close(self) -> None:
        self.writer.close()
