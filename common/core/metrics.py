"""Loss/accuracy meters kept as weighted sums, throughput, and a JSON-lines writer.

Meters hold sums (loss sum, correct count, sample count), never averages, so
reducing them across ranks is a plain sum and uneven shards count correctly.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import numpy as np

# The label a sample carries when it is not to be scored (an unreadable image left blank):
# no loss, no gradient, never correct. PyTorch's cross_entropy ignores it by default.
IGNORED_LABEL = -100


def softmax_cross_entropy_sums(logits: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(summed loss, correct count) of a batch of logits, in float64; IGNORED_LABEL samples
    count in neither."""
    scored = labels != IGNORED_LABEL
    logits, labels = logits[scored].astype(np.float64), labels[scored]
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probabilities = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    loss = -log_probabilities[np.arange(len(labels)), labels].sum()
    return float(loss), float((logits.argmax(axis=1) == labels).sum())


LOSS_SUM, CORRECT, COUNT = 0, 1, 2  # a meter's sums, in this order (one array: one allreduce)


class Meter:
    def __init__(self):
        self.sums = np.zeros(3, dtype=np.float64)  # loss sum, correct, samples

    def add(self, loss_sum, correct, count):
        self.sums += (loss_sum, correct, count)

    @property
    def mean_loss(self) -> float:
        """The mean loss so far (0 before any sample)."""
        return float(self.sums[LOSS_SUM] / max(1.0, self.sums[COUNT]))

    @staticmethod
    def results(sums) -> Evaluation:
        """(mean loss, accuracy) from summed (loss, correct, count), e.g. after an allreduce."""
        loss_sum, correct, count = (float(value) for value in sums)
        if count == 0:
            return Evaluation(float("nan"), float("nan"))
        return Evaluation(loss_sum / count, correct / count)


class Evaluation(NamedTuple):
    """A test-set evaluation over all ranks; ``blank``: unreadable images left out of it."""
    loss: float
    accuracy: float
    blank: int = 0


class EpochSums(NamedTuple):
    """What one allreduce sums over the ranks at an epoch's end: the meter's sums, and the
    data wait of the ranks that read images (with how many of them did), and the unreadable
    images they left blank."""
    loss_sum: float
    correct: float
    samples: float
    waited_seconds: float
    image_readers: float
    blank: float

    def wait_share(self, seconds: float) -> float:
        """The share of the epoch an image-reading rank waited for images, on average."""
        return self.waited_seconds / max(1.0, self.image_readers) / seconds if seconds > 0 else 0.0


class PendingSums(Protocol):
    """A step's (loss sum, correct, count) still on the device: reading it waits for the
    step. The trainer reads a step's sums only once the next step is queued, so the
    device never idles while the host looks at them."""

    def resolve(self) -> np.ndarray: ...


StepSums = np.ndarray | PendingSums


def resolved(sums: StepSums) -> np.ndarray:
    """float64 (loss sum, correct, count), waiting for the device if they are still there."""
    return np.asarray(sums.resolve() if hasattr(sums, "resolve") else sums, dtype=np.float64)


class Stopwatch:
    def __init__(self):
        self.start = time.perf_counter()

    def seconds(self):
        return time.perf_counter() - self.start


def median_call_seconds(call: Callable[[], object], repeats: int, least_seconds: float) -> float:
    """The median time of ``call()`` (which must wait for its work to finish) after one that
    warms up, over at least ``repeats`` calls and ``least_seconds`` of them: a mean of five
    millisecond steps moves with any interruption, and rankings rest on these figures."""
    call()
    seconds: list[float] = []
    while len(seconds) < repeats or sum(seconds) < least_seconds:
        start = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - start)
    return float(np.median(seconds))


def append_whole(handle: int, data: bytes) -> None:
    """Append ``data`` to an O_APPEND descriptor all or nothing: a write cut short (a full
    disk) is undone, so the file stays readable and a later append continues it cleanly."""
    size = os.fstat(handle).st_size
    try:
        written = 0
        while written < len(data):
            written += os.write(handle, data[written:])
    except OSError:
        with contextlib.suppress(OSError):
            os.ftruncate(handle, size)
        raise


class JsonLinesWriter:
    """Appends one JSON object per line, whole or not at all (a full disk leaves the file
    as it was); a no-op when ``path`` is empty."""

    def __init__(self, path):
        self.path = path

    def write(self, record):
        if not self.path:
            return
        handle = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            append_whole(handle, (json.dumps(record, sort_keys=True) + "\n").encode())
        finally:
            os.close(handle)


def last_epoch_recorded(path: str) -> int:
    """The last epoch a metrics file holds a training record of (0: none, or no file). Lines
    that do not parse (a file cut short by hand) are passed over."""
    last = 0
    try:
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict) and not record.get("evaluation_only") and \
                        isinstance(record.get("epoch"), int):
                    last = max(last, record["epoch"])
    except OSError:
        return 0
    return last


@dataclass
class EpochResult:
    """One epoch's training, over all ranks."""
    loss: float
    accuracy: float
    images_per_sec: float            # all ranks together
    seconds: float
    lr: float                        # at the epoch's last step
    stopped_after: int | None = None  # steps done, when every rank agreed to stop early
    data_wait: float = 0.0           # share of the epoch the image-reading ranks waited for images
    steps: int = 0                   # optimizer steps taken
    blank: int = 0                   # unreadable images left blank and out of the loss (--skip-bad-images)
    peak_memory: tuple = ()          # each rank's peak memory so far, bytes (common/observe/memory.py)


def epoch_record(epoch: int, train: EpochResult, test: Evaluation, world_size: int, config,
                 framework: str, predicted_memory: Sequence[int] = ()) -> dict:
    """The metrics-file record for one epoch, identical in shape for both frameworks."""
    return {**memory_record(train.peak_memory, predicted_memory),
        "epoch": epoch, "train_loss": train.loss, "train_accuracy": train.accuracy,
        "test_loss": test.loss, "test_accuracy": test.accuracy,
        "images_per_sec": train.images_per_sec, "images_per_sec_per_rank": train.images_per_sec / world_size,
        "epoch_seconds": train.seconds, "world_size": world_size, "mode": config.mode, "framework": framework,
        "dataset": config.dataset, "model": config.model,
        "global_batch_size": config.global_batch_size(world_size), "lr": train.lr,
        "data_wait_fraction": train.data_wait, "step_seconds": train.seconds / max(1, train.steps),
        **blank_record(config, train.blank, test.blank),
    }


def memory_record(peaks: Sequence[int], predicted: Sequence[int]) -> dict:
    """Each rank's peak memory so far and its prediction, in bytes, with the largest of each."""
    record: dict = {}
    if peaks:
        record.update(peak_memory_bytes=list(peaks), peak_memory_max_bytes=max(peaks))
    if predicted:
        record.update(predicted_memory_bytes=list(predicted), predicted_memory_max_bytes=max(predicted))
    return record


def blank_record(config, train: int, test: int) -> dict:
    """--skip-bad-images: how many unreadable images this epoch's training and evaluation
    left blank and out of their loss and accuracy."""
    return {"blank_images": {"train": train, "test": test}} if config.skip_bad_images else {}


def evaluation_record(epochs_done: int, test: Evaluation, world_size: int, config, framework: str) -> dict:
    """The metrics-file record of a run that only evaluates (--epochs 0, or resumed at its end)."""
    return {"epoch": epochs_done, "evaluation_only": True, "test_loss": test.loss, "test_accuracy": test.accuracy,
            "world_size": world_size, "mode": config.mode, "framework": framework, "dataset": config.dataset,
            "model": config.model, "init_from": config.init_from, **blank_record(config, 0, test.blank)}


def format_epoch(record: dict, epochs: int) -> str:
    return (f"epoch {record['epoch']}/{epochs}  train loss {record['train_loss']:.4f} "
            f"acc {record['train_accuracy']:.4f}  test loss {record['test_loss']:.4f} "
            f"acc {record['test_accuracy']:.4f}  {record['images_per_sec']:.0f} img/s "
            f"({record['images_per_sec_per_rank']:.0f}/rank x {record['world_size']})  "
            f"{record['epoch_seconds']:.1f}s"
            + (f"  data wait {record['data_wait_fraction']:.0%}" if record["dataset"] == "folder" else "")
            + format_memory(record)
            + format_blank(record.get("blank_images")))


def format_memory(record: dict) -> str:
    if "peak_memory_max_bytes" not in record:
        return ""
    predicted = record.get("predicted_memory_max_bytes")
    return (f"  peak memory {record['peak_memory_max_bytes'] / 2 ** 20:.0f} MiB/rank"
            + (f" (predicted {predicted / 2 ** 20:.0f})" if predicted else ""))


def format_blank(blank: dict | None) -> str:
    if not blank or not (blank["train"] or blank["test"]):
        return ""
    return f"  unreadable images left out: {blank['train']} train, {blank['test']} test"


def log(message: str) -> None:
    """Write one whole line at once: launchers that tag output per write (mpirun
    --tag-output, horovodrun) would otherwise tag a lone trailing newline."""
    sys.stdout.write(message + "\n")
    sys.stdout.flush()
