"""Loss/accuracy meters kept as weighted sums, throughput, and a JSON-lines writer.

Meters hold sums (loss sum, correct count, sample count), never averages, so
reducing them across ranks is a plain sum and uneven shards count correctly.
"""

import json
import sys
import time

import numpy as np


class Meter:
    def __init__(self):
        self.sums = np.zeros(3, dtype=np.float64)  # loss sum, correct, samples

    def add(self, loss_sum, correct, count):
        self.sums += (loss_sum, correct, count)

    @staticmethod
    def results(sums):
        """(mean loss, accuracy) from summed (loss, correct, count), e.g. after an allreduce."""
        loss_sum, correct, count = (float(value) for value in sums)
        if count == 0:
            return float("nan"), float("nan")
        return loss_sum / count, correct / count


class Stopwatch:
    def __init__(self):
        self.start = time.perf_counter()

    def seconds(self):
        return time.perf_counter() - self.start


def throughput(images, seconds, world_size):
    """Images/sec in total and per rank."""
    total = images / seconds if seconds > 0 else 0.0
    return total, total / world_size


class JsonLinesWriter:
    """Appends one JSON object per line; a no-op when ``path`` is empty."""

    def __init__(self, path):
        self.path = path

    def write(self, record):
        if not self.path:
            return
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")


def epoch_record(epoch, train, test, images_per_sec, world_size, config, framework, seconds, lr):
    """The metrics-file record for one epoch, identical in shape for both frameworks."""
    (train_loss, train_accuracy), (test_loss, test_accuracy) = train, test
    total, per_rank = images_per_sec
    return {
        "epoch": epoch, "train_loss": train_loss, "train_accuracy": train_accuracy,
        "test_loss": test_loss, "test_accuracy": test_accuracy,
        "images_per_sec": total, "images_per_sec_per_rank": per_rank, "epoch_seconds": seconds,
        "world_size": world_size, "mode": config.mode, "framework": framework,
        "dataset": config.dataset, "model": config.model,
        "global_batch_size": config.global_batch_size(world_size), "lr": lr,
    }


def format_epoch(record, epochs):
    return (f"epoch {record['epoch']}/{epochs}  train loss {record['train_loss']:.4f} "
            f"acc {record['train_accuracy']:.4f}  test loss {record['test_loss']:.4f} "
            f"acc {record['test_accuracy']:.4f}  {record['images_per_sec']:.0f} img/s "
            f"({record['images_per_sec_per_rank']:.0f}/rank x {record['world_size']})  "
            f"{record['epoch_seconds']:.1f}s")


def log(message):
    """Write one whole line at once: launchers that tag output per write (mpirun
    --tag-output, horovodrun) would otherwise tag a lone trailing newline."""
    sys.stdout.write(message + "\n")
    sys.stdout.flush()
