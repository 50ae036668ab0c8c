"""Datasets (NCHW images, int64 labels) and exact sharding.

Small datasets are held in memory as pixels (uint8 where the data is bytes)
with their normalisation (common/data/batches.py); image folders are streamed from
disk (common/data/decoders.py) behind the same indexing: ``x_train[indices]`` is the
float32 model input, ``x_train.read_into(indices, out)`` the pixels a device
normalises itself. Images are channel-first here; the TensorFlow side
transposes to NHWC.
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import os
import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from math import prod
from typing import TYPE_CHECKING

import numpy as np

from common.core.config import DatasetName
from common.core.errors import UsageError, launcher_rank
from common.data import decoders, folders, image_checks, jpeg, transforms
from common.data.batches import InMemoryImages, Normalisation
from common.data.splits import stratified_split
from common.launch.cpu_budget import cpus_per_rank
from common.launch.environment import launcher_world_size

if TYPE_CHECKING:
    from common.core.config import RunConfig


CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_FILE = "test_batch"
CIFAR10_MEAN = np.array([0.4914, 0.4822, 0.4465], dtype=np.float32).reshape(1, 3, 1, 1)
CIFAR10_STD = np.array([0.2470, 0.2435, 0.2616], dtype=np.float32).reshape(1, 3, 1, 1)
CIFAR10_NORMALISATION = Normalisation.from_mean_std(CIFAR10_MEAN.ravel(), CIFAR10_STD.ravel())
# Synthetic pixels are uniform over 0..255: this makes them mean 0, variance 1.
SYNTHETIC_NORMALISATION = Normalisation.from_mean_std((127.5 / 255,), (np.sqrt((256**2 - 1) / 12) / 255,))


@dataclass
class Dataset:
    name: str
    x_train: InMemoryImages | decoders.StreamedImages
    y_train: np.ndarray
    x_test: InMemoryImages | decoders.StreamedImages
    y_test: np.ndarray
    num_classes: int
    decode_on_device: bool = False   # --decode gpu: the device decodes the JPEGs (common/data/jpeg.py)

    @property
    def image_shape(self):
        return tuple(self.x_train.shape[1:])

    @property
    def normalisation(self) -> Normalisation:
        """How this set's pixels become model inputs (the same for train and test)."""
        return self.x_train.normalisation

    @property
    def streamed(self) -> bool:
        return isinstance(self.x_train, decoders.StreamedImages)

    @property
    def decoder_workers(self) -> int:
        """Decoder processes per rank of a streamed set (0 for one in memory)."""
        return self.x_train.workers if isinstance(self.x_train, decoders.StreamedImages) else 0

    def plan_train(self, order: np.ndarray, epoch: int, lookahead: int) -> None:
        """The order this rank will read training samples in (streamed sets decode ahead)."""
        if isinstance(self.x_train, decoders.StreamedImages):
            self.x_train.plan(order, epoch, lookahead)

    def plan_test(self, order: np.ndarray, lookahead: int) -> None:
        if isinstance(self.x_test, decoders.StreamedImages):
            self.x_test.plan(order, 0, lookahead)

    def encoded_reader(self, split: str):
        """--decode gpu: the function that reads a split's files for the device to decode, or None."""
        images = self.x_train if split == "train" else self.x_test
        if not (self.decode_on_device and isinstance(images, decoders.StreamedImages)):
            return None
        return images.read_encoded

    def close(self) -> None:
        for images in (self.x_train, self.x_test):
            if isinstance(images, decoders.StreamedImages):
                images.close()

    def stop_decoders(self) -> None:
        """On a rank that never reads images (a later pipeline stage, the parameter server):
        its decoder processes, needed only for the start-up check of its share of the files."""
        for images in (self.x_train, self.x_test):
            if isinstance(images, decoders.StreamedImages):
                images.stop_decoders()


def load_dataset(config: RunConfig) -> Dataset:
    if config.dataset == DatasetName.DIGITS:
        return load_digits()
    if config.dataset == DatasetName.CIFAR10:
        return load_cifar10(config.data_dir)
    if config.dataset == DatasetName.SYNTHETIC:
        return make_synthetic(config.synthetic_image_shape(), config.synthetic_samples,
                              config.num_classes, config.seed)
    if config.dataset == DatasetName.FOLDER:
        return load_folder(config)
    raise UsageError(f"unknown dataset {config.dataset!r}; choose digits, cifar10, synthetic or folder")


def load_folder(config: RunConfig) -> Dataset:
    """An image folder (common/data/decoders.py), its files checked before training: each rank
    checks its share, so the job reads every file once."""
    index = folders.scan_folder(config.data_dir, config.val_fraction)
    channels = config.channels or image_checks.infer_channels(index)
    workers = config.data_workers if config.data_workers >= 0 else cpus_per_rank()
    pool = decoders.start_workers(workers)
    every_file = index.train.paths + index.val.paths
    share = split_evenly(np.arange(len(every_file)), launcher_world_size(), launcher_rank())
    if config.check_images != "none":
        try:
            image_checks.check_images([every_file[i] for i in share], config.check_images == "full", pool)
        except BaseException:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
            raise
    train = decoders.StreamedImages(index.train.paths, transforms.ImageTransform(config.image_size, channels,
                                                                           config.augment, config.seed),
                                  pool, config.skip_bad_images)
    test = decoders.StreamedImages(index.val.paths, transforms.ImageTransform(config.image_size, channels, False),
                                 pool, config.skip_bad_images)
    return Dataset(f"folder {index.root} ({len(index.classes)} classes, {index.layout})", train,
                   index.train.labels, test, index.val.labels, len(index.classes),
                   decode_on_device=config.decode == "gpu" and _device_can_decode(every_file))


def _device_can_decode(paths) -> bool:
    """--decode gpu: whether the folder's files are JPEGs the device decodes (a sample of them
    is looked at), saying so in one line when some or all are not."""
    decodable, looked_at = jpeg.count_decodable(paths)
    if launcher_rank() == 0 and decodable < looked_at:
        if decodable == 0:
            print(f"--decode gpu: none of {looked_at} files looked at is a JPEG the GPU decodes (baseline or "
                  "progressive, 8-bit, gray or RGB); every image is decoded on the CPU", flush=True)
        else:
            print(f"--decode gpu: {looked_at - decodable} of {looked_at} files looked at are not JPEGs the GPU "
                  "decodes (PNG, CMYK, ...); those are decoded on the CPU, the rest on the GPU", flush=True)
    return decodable > 0


def load_digits(test_fraction: float = 0.2) -> Dataset:
    """scikit-learn's bundled 8x8 digits (1,797 images), split 80/20 stratified, fixed."""
    with gzip.open(digits_file(), "rt") as rows:
        table = np.loadtxt(rows, delimiter=",")  # 64 grey levels 0..16, then the label
    pixels = table[:, :-1].astype(np.uint8).reshape(-1, 1, 8, 8)
    labels = table[:, -1].astype(np.int64)
    train, test = stratified_split(labels, test_fraction, seed=0)
    normalisation = Normalisation((1 / 16,), (0.5,))  # level / 16 - 0.5, in [-0.5, 0.5]
    return Dataset("digits", InMemoryImages(pixels[train], normalisation), labels[train],
                   InMemoryImages(pixels[test], normalisation), labels[test], num_classes=10)


def digits_file() -> str:
    """Where scikit-learn keeps the digits, found without importing it (that costs a second)."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise UsageError("the digits dataset comes with scikit-learn, which is not installed; run make install")
    return os.path.join(list(spec.submodule_search_locations)[0], "datasets", "data", "digits.csv.gz")


MAX_CIFAR_FILE_BYTES = 512 << 20  # a CIFAR-10 batch is 31 MB, CIFAR-100's train file 158 MB


class CifarFileRefused(Exception):
    """The file asks the unpickler for something CIFAR's python batches never hold."""


def _empty_array(subtype, shape, dtype):
    # numpy pickles an array as _reconstruct(ndarray, (0,), b'b') and then sets its
    # state from the bytes in the file: only that exact empty form is admitted, so
    # a crafted file cannot ask for a huge allocation up front.
    if subtype is not np.ndarray or prod(tuple(shape)) != 0:
        raise CifarFileRefused("array reconstruction with another type or a non-empty shape")
    return np.ndarray.__new__(np.ndarray, shape, dtype)


def _plain_dtype(*args):
    dtype = np.dtype(*args)
    if dtype.hasobject:
        raise CifarFileRefused("an object dtype")
    return dtype


def _latin1_bytes(text, encoding):
    # How Python 3 writes bytes at pickle protocol 2: _codecs.encode(str, 'latin1').
    if not isinstance(text, str) or encoding != "latin1":
        raise CifarFileRefused("a codec call other than latin-1 bytes")
    return text.encode("latin1")


def _array_from_bytes(buffer, dtype, shape, order):
    # numpy's protocol-5 pickles: an array over bytes that are in the file.
    return np.frombuffer(buffer, dtype=_plain_dtype(dtype)).reshape(shape, order=order)


class CifarUnpickler(pickle.Unpickler):
    """Reads CIFAR's python batches (dicts of bytes, ints, lists and uint8 arrays) and
    nothing else: any other global (a function to call, a class to build) is refused,
    so a crafted file cannot run code."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"): _empty_array,
               ("numpy._core.multiarray", "_reconstruct"): _empty_array,
               ("numpy.core.numeric", "_frombuffer"): _array_from_bytes,
               ("numpy._core.numeric", "_frombuffer"): _array_from_bytes,
               ("numpy", "ndarray"): np.ndarray,
               ("_codecs", "encode"): _latin1_bytes,
               ("numpy", "dtype"): _plain_dtype}

    def find_class(self, module, name):
        found = self.ALLOWED.get((module, name))
        if found is None:
            raise CifarFileRefused(f"it asks to load {module}.{name}, which CIFAR-10 files never hold")
        return found


def read_cifar_pickle(path: str) -> object:
    """One CIFAR python batch as a dict, through CifarUnpickler (bounded in size)."""
    size = os.path.getsize(path)
    if size > MAX_CIFAR_FILE_BYTES:
        raise CifarFileRefused(f"{size} bytes, more than any CIFAR batch ({MAX_CIFAR_FILE_BYTES})")
    with open(path, "rb") as handle:
        return CifarUnpickler(io.BytesIO(handle.read()), encoding="bytes").load()


def _read_cifar_batch(path):
    if not os.path.isfile(path):
        raise UsageError(f"cifar10: {path} is missing; download {CIFAR10_URL}, extract it and "
                         "pass the cifar-10-batches-py directory as --data-dir")
    try:
        batch = read_cifar_pickle(path)
        if not isinstance(batch, dict):
            raise ValueError(f"it holds a {type(batch).__name__}, not a dict")
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
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar10(data_dir):
    if not os.path.isdir(data_dir):
        raise UsageError(f"cifar10: directory {data_dir} not found; download {CIFAR10_URL}, "
                         "extract it and pass the cifar-10-batches-py directory as --data-dir")
    parts = [_read_cifar_batch(os.path.join(data_dir, name)) for name in CIFAR10_TRAIN_FILES]
    x_test, y_test = _read_cifar_batch(os.path.join(data_dir, CIFAR10_TEST_FILE))
    x_train = np.concatenate([pixels for pixels, _ in parts])
    y_train = np.concatenate([labels for _, labels in parts])
    return Dataset("cifar10", InMemoryImages(x_train, CIFAR10_NORMALISATION), y_train,
                   InMemoryImages(x_test, CIFAR10_NORMALISATION), y_test, num_classes=10)


def make_synthetic(image_shape: tuple, train_samples: int, num_classes: int, seed: int) -> Dataset:
    """Random images (uniform bytes, normalised to mean 0 and variance 1) with random labels:
    for throughput, not for accuracy."""
    rng = np.random.default_rng(seed + 12345)
    test_samples = max(1, train_samples // 4)
    total = train_samples + test_samples
    pixels = rng.integers(0, 256, size=(total, *image_shape), dtype=np.uint8)
    labels = rng.integers(0, num_classes, size=total, dtype=np.int64)
    normalisation = Normalisation(SYNTHETIC_NORMALISATION.scale * image_shape[0],
                                  SYNTHETIC_NORMALISATION.shift * image_shape[0])
    return Dataset("synthetic", InMemoryImages(pixels[:train_samples], normalisation), labels[:train_samples],
                   InMemoryImages(pixels[train_samples:], normalisation), labels[train_samples:], num_classes)


# --- Exact sharding -----------------------------------------------------------
#
# One permutation per epoch (same on every rank, from the seed) is cut into
# global batches; each global batch is split across ranks as evenly as
# possible. So every sample is used exactly once per epoch, no sample is
# padded or duplicated, and every rank runs the same number of steps (a rank
# whose share of the last batch is empty still joins that step's allreduce).

def steps_per_epoch(num_samples: int, global_batch: int, step_limit: int = 0) -> int:
    steps = -(-num_samples // global_batch)
    return min(steps, step_limit) if step_limit else steps


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(num_samples)


def split_evenly(indices: np.ndarray, parts: int, part: int) -> np.ndarray:
    """Part ``part`` of ``indices`` cut into ``parts`` contiguous near-equal pieces."""
    base, extra = divmod(len(indices), parts)
    start = part * base + min(part, extra)
    return indices[start:start + base + (1 if part < extra else 0)]


def rank_batches(num_samples: int, global_batch: int, world_size: int, rank: int, seed: int, epoch: int,
                 step_limit: int = 0) -> list[tuple[np.ndarray, int]]:
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


def eval_shard(num_samples: int, world_size: int, rank: int) -> np.ndarray:
    """This rank's contiguous slice of an evaluation set (all samples, once)."""
    return split_evenly(np.arange(num_samples), world_size, rank)


def batched(indices: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    for start in range(0, len(indices), batch_size):
        yield indices[start:start + batch_size]
