"""Datasets as numpy arrays (NCHW float32 images, int64 labels) and exact sharding.

Images are channel-first here; the TensorFlow side transposes to NHWC.
"""

import os
import pickle
from dataclasses import dataclass

import numpy as np

from common.errors import UsageError

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_FILE = "test_batch"
CIFAR10_MEAN = np.array([0.4914, 0.4822, 0.4465], dtype=np.float32).reshape(1, 3, 1, 1)
CIFAR10_STD = np.array([0.2470, 0.2435, 0.2616], dtype=np.float32).reshape(1, 3, 1, 1)


@dataclass
class Dataset:
    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int

    @property
    def image_shape(self):
        return tuple(self.x_train.shape[1:])


def load_dataset(config):
    if config.dataset == "digits":
        return load_digits()
    if config.dataset == "cifar10":
        return load_cifar10(config.data_dir)
    if config.dataset == "synthetic":
        return make_synthetic(config.synthetic_image_shape(), config.synthetic_samples,
                              config.num_classes, config.seed)
    raise UsageError(f"unknown dataset {config.dataset!r}; choose digits, cifar10 or synthetic")


def load_digits(test_fraction=0.2):
    """scikit-learn's bundled 8x8 digits (1,797 images), split 80/20 stratified, fixed."""
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    bunch = sklearn_digits()
    images = (bunch.images.astype(np.float32) / 16.0 - 0.5)[:, None, :, :]
    labels = bunch.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=test_fraction, random_state=0, stratify=labels)
    return Dataset("digits", x_train, y_train, x_test, y_test, num_classes=10)


def _read_cifar_batch(path):
    if not os.path.isfile(path):
        raise UsageError(f"cifar10: {path} is missing; download {CIFAR10_URL}, extract it and "
                         "pass the cifar-10-batches-py directory as --data-dir")
    try:
        with open(path, "rb") as handle:
            batch = pickle.load(handle, encoding="bytes")
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
            raise ValueError(f"data has shape {data.shape} with {len(labels)} labels, "
                             "expected (N, 3072) with N labels")
        if labels.size and (labels.min() < 0 or labels.max() > 9):
            raise ValueError("labels outside 0..9")
    except Exception as error:  # any unpickling/shape failure means a bad file
        raise UsageError(f"cifar10: cannot read {path} ({type(error).__name__}: {error}); the file "
                         f"is corrupt or not CIFAR-10 python format: re-download {CIFAR10_URL}") from None
    images = data.reshape(-1, 3, 32, 32).astype(np.float32) / 255.0
    return (images - CIFAR10_MEAN) / CIFAR10_STD, labels


def load_cifar10(data_dir):
    if not os.path.isdir(data_dir):
        raise UsageError(f"cifar10: directory {data_dir} not found; download {CIFAR10_URL}, "
                         "extract it and pass the cifar-10-batches-py directory as --data-dir")
    parts = [_read_cifar_batch(os.path.join(data_dir, name)) for name in CIFAR10_TRAIN_FILES]
    x_test, y_test = _read_cifar_batch(os.path.join(data_dir, CIFAR10_TEST_FILE))
    x_train = np.concatenate([images for images, _ in parts])
    y_train = np.concatenate([labels for _, labels in parts])
    return Dataset("cifar10", x_train, y_train, x_test, y_test, num_classes=10)


def make_synthetic(image_shape, train_samples, num_classes, seed):
    """Random images with random labels: for throughput, not for accuracy."""
    rng = np.random.default_rng(seed + 12345)
    test_samples = max(1, train_samples // 4)
    total = train_samples + test_samples
    images = rng.standard_normal((total, *image_shape), dtype=np.float32)
    labels = rng.integers(0, num_classes, size=total, dtype=np.int64)
    return Dataset("synthetic", images[:train_samples], labels[:train_samples],
                   images[train_samples:], labels[train_samples:], num_classes)


# --- Exact sharding -----------------------------------------------------------
#
# One permutation per epoch (same on every rank, from the seed) is cut into
# global batches; each global batch is split across ranks as evenly as
# possible. So every sample is used exactly once per epoch, no sample is
# padded or duplicated, and every rank runs the same number of steps (a rank
# whose share of the last batch is empty still joins that step's allreduce).

def steps_per_epoch(num_samples, global_batch, step_limit=0):
    steps = -(-num_samples // global_batch)
    return min(steps, step_limit) if step_limit else steps


def epoch_permutation(num_samples, seed, epoch):
    return np.random.default_rng([seed, epoch]).permutation(num_samples)


def split_evenly(indices, parts, part):
    """Part ``part`` of ``indices`` cut into ``parts`` contiguous near-equal pieces."""
    base, extra = divmod(len(indices), parts)
    start = part * base + min(part, extra)
    return indices[start:start + base + (1 if part < extra else 0)]


def rank_batches(num_samples, global_batch, world_size, rank, seed, epoch, step_limit=0):
    """The sample indices this rank trains on at each step of ``epoch``.

    Returns a list (one entry per step) of (rank_indices, global_batch_count):
    the count is what the summed per-sample losses are divided by, so uneven
    shares still give the exact mean over the global batch.
    """
    order = epoch_permutation(num_samples, seed, epoch)
    batches = []
    for step in range(steps_per_epoch(num_samples, global_batch, step_limit)):
        batch = order[step * global_batch:(step + 1) * global_batch]
        batches.append((split_evenly(batch, world_size, rank), len(batch)))
    return batches


def eval_shard(num_samples, world_size, rank):
    """This rank's contiguous slice of an evaluation set (all samples, once)."""
    return split_evenly(np.arange(num_samples), world_size, rank)


def batched(indices, batch_size):
    for start in range(0, len(indices), batch_size):
        yield indices[start:start + batch_size]
