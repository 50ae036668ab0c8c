"""TensorBoard events for a run, identical tags in both frameworks, written by the
rank that owns the metrics (tensorboardX's writer: protobuf and numpy, no framework).

Tags (the x axis is the epoch, except ``train/step_loss``'s, the optimizer step):
    train/loss  train/accuracy  test/loss  test/accuracy  lr
    throughput/images_per_sec  time/step_seconds  time/data_wait_fraction
    memory/peak_bytes  memory/predicted_bytes   (the rank that holds the most)
    train/step_loss   (every --log-every steps: the global batch's mean loss)
and the resolved configuration as the text ``config``.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys
import time

from common.core.metrics import append_whole

EPOCH_TAGS = {"train_loss": "train/loss", "train_accuracy": "train/accuracy", "test_loss": "test/loss",
              "test_accuracy": "test/accuracy", "lr": "lr", "images_per_sec": "throughput/images_per_sec",
              "step_seconds": "time/step_seconds", "data_wait_fraction": "time/data_wait_fraction",
              "peak_memory_max_bytes": "memory/peak_bytes", "predicted_memory_max_bytes": "memory/predicted_bytes"}
STEP_LOSS_TAG = "train/step_loss"
CONFIG_TAG = "config"


def _tensorboardx():
    """tensorboardX's summary builders, event protobuf and record checksum, imported
    without the framework it would otherwise load to accept its tensors (torch, 2 s and
    hundreds of MB, in a TensorFlow rank)."""
    blocked = [name for name in ("torch",) if name not in sys.modules]
    for name in blocked:
        sys.modules[name] = None  # makes `import torch` raise ImportError, which tensorboardX expects
    try:
        from tensorboardX import summary
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.record_writer import masked_crc32c
    finally:
        for name in blocked:
            del sys.modules[name]
    return summary, Event, masked_crc32c


class TensorBoardLog:
    """Scalars per epoch and per logged step, and the configuration once, in one event
    file written synchronously by the calling thread (tensorboardX's SummaryWriter
    writes from a thread of its own, whose errors, a full disk's among them, surface
    late and as tracebacks): an OSError reaches the caller, and the file keeps only
    whole records."""

    def __init__(self, directory: str, config: dict, command: list | None = None):
        self.summary, self.Event, self.checksum = _tensorboardx()
        os.makedirs(directory, exist_ok=True)
        self.path = os.path.join(directory, f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}")
        self.handle: int | None = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        text = "    " + json.dumps(config, indent=1, sort_keys=True).replace("\n", "\n    ")  # markdown code
        if command:
            text = "    " + " ".join(command) + "\n\n" + text
        self._write(self.Event(wall_time=time.time(), file_version="brain.Event:2"),
                    self.Event(wall_time=time.time(), step=0, summary=self.summary.text(CONFIG_TAG, text)))

    def epoch(self, record: dict) -> None:
        self._write(*(self._scalar(tag, record[key], record["epoch"]) for key, tag in EPOCH_TAGS.items()
                      if record.get(key) is not None))

    def step_loss(self, step: int, loss: float) -> None:
        self._write(self._scalar(STEP_LOSS_TAG, loss, step))

    def _scalar(self, tag: str, value: float, step: int):
        return self.Event(wall_time=time.time(), step=int(step), summary=self.summary.scalar(tag, float(value)))

    def _write(self, *events) -> None:
        """TFRecord framing: length, its checksum, the event, its checksum."""
        records = []
        for event in events:
            data = event.SerializeToString()
            header = struct.pack("<Q", len(data))
            records += [header, struct.pack("<I", self.checksum(header)), data, struct.pack("<I", self.checksum(data))]
        assert self.handle is not None, "events written after close()"
        append_whole(self.handle, b"".join(records))

    def close(self) -> None:
        if self.handle is not None:
            os.close(self.handle)
            self.handle = None
