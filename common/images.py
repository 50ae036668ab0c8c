"""Image folders: scanned once, checked before training, decoded and augmented
in worker processes, streamed to either framework as numpy batches.

Layouts (torchvision ImageFolder / Keras image_dataset_from_directory):
``DIR/train/<class>/*`` with ``DIR/val/<class>/*`` (or ``test``), or one tree
``DIR/<class>/*`` split into train and validation by a fixed, stratified draw.
Classes are the sorted folder names, so label indices are the same in every
layout and framework.

Every random choice of a sample's augmentation is drawn from a generator
seeded by (seed, epoch, sample index): a sample looks the same whichever
rank, worker or framework reads it, so N ranks compute what one rank does.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import warnings
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import numpy as np

from common import batches, jpeg
from common.batches import Normalisation
from common.errors import RankUsageError, UsageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
SPLIT_NAMES = (("train", "val"), ("train", "test"))
SPLIT_SEED = 20240611  # the held-out files never change with --seed: a checkpoint is always judged on the same ones
GRAYSCALE_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")
# ImageNet's statistics (the standard recipe; grayscale images take their mean).
RGB_MEAN, RGB_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
GRAY_MEAN, GRAY_STD = (0.449,), (0.226,)
EVAL_RESIZE_RATIO = 0.875  # resize to size / 0.875 (256 for 224), then centre-crop size
SAMPLES_PER_TASK = 8


# --- the file list ----------------------------------------------------------------

@dataclass(frozen=True)
class Split:
    paths: tuple
    labels: np.ndarray  # int64, index into FolderIndex.classes


@dataclass(frozen=True)
class FolderIndex:
    root: str
    classes: tuple
    train: Split
    val: Split
    layout: str  # "train/val", "train/test" or "split"


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _class_files(directory: str) -> dict:
    """{class name: sorted image paths} of one class-folder tree; UsageError if it is not one."""
    try:
        entries = sorted(os.scandir(directory), key=lambda entry: entry.name)
    except OSError as error:
        raise UsageError(f"folder dataset: cannot read {directory} ({error.strerror}); check the path and "
                         "its permissions") from None
    classes = {}
    for entry in entries:
        if entry.is_dir() and not entry.name.startswith("."):
            files = []
            for root, folders, names in os.walk(entry.path, followlinks=True):
                folders.sort()
                files += [os.path.join(root, name) for name in sorted(names) if _is_image_name(name)]
            if not files:
                raise UsageError(f"folder dataset: class folder {entry.path} holds no images "
                                 f"({'/'.join(IMAGE_EXTENSIONS)}); add images or remove the folder")
            classes[entry.name] = files
    if not classes:
        raise UsageError(f"folder dataset: {directory} has no class folders; lay it out as DIR/<class>/*.jpg "
                         "or DIR/train/<class>/* with DIR/val/<class>/*")
    if len(classes) < 2:
        raise UsageError(f"folder dataset: {directory} has one class folder ({next(iter(classes))}); "
                         "a classifier needs at least two")
    return classes


def _as_split(classes: tuple, files: dict) -> Split:
    paths, labels = [], []
    for label, name in enumerate(classes):
        paths += files[name]
        labels += [label] * len(files[name])
    return Split(tuple(paths), np.asarray(labels, dtype=np.int64))


def stratified_split(files: dict, val_fraction: float) -> tuple[dict, dict]:
    """Per class, a fixed random ``val_fraction`` of its files (at least one, never all) held out."""
    rng = np.random.default_rng(SPLIT_SEED)
    train, val = {}, {}
    for name, paths in files.items():
        order = rng.permutation(len(paths))
        held = min(len(paths) - 1, max(1, round(val_fraction * len(paths)))) if len(paths) > 1 else 0
        val[name] = [paths[i] for i in sorted(order[:held])]
        train[name] = [paths[i] for i in sorted(order[held:])]
    return train, val


def scan_folder(root: str, val_fraction: float) -> FolderIndex:
    """The file list of an image folder in either layout (UsageError naming what is wrong)."""
    if not os.path.isdir(root):
        raise UsageError(f"folder dataset: directory {root} not found; pass an existing --data-dir")
    for train_name, val_name in SPLIT_NAMES:
        train_dir, val_dir = os.path.join(root, train_name), os.path.join(root, val_name)
        if os.path.isdir(train_dir) and os.path.isdir(val_dir):
            train, val = _class_files(train_dir), _class_files(val_dir)
            if set(train) != set(val):
                only_train, only_val = sorted(set(train) - set(val)), sorted(set(val) - set(train))
                raise UsageError(f"folder dataset: {train_dir} and {val_dir} hold different classes (only in "
                                 f"{train_name}: {', '.join(only_train) or '-'}; only in {val_name}: "
                                 f"{', '.join(only_val) or '-'}); give both the same class folders")
            classes = tuple(sorted(train))
            return FolderIndex(root, classes, _as_split(classes, train), _as_split(classes, val),
                               f"{train_name}/{val_name}")
    if os.path.isdir(os.path.join(root, "train")):
        raise UsageError(f"folder dataset: {root} has train/ but no val/ (or test/) beside it; add one, or "
                         "point --data-dir at the train folder to split it with --val-fraction")
    files = _class_files(root)
    classes = tuple(sorted(files))
    train, val = stratified_split(files, val_fraction)
    return FolderIndex(root, classes, _as_split(classes, train), _as_split(classes, val), "split")


def infer_channels(index: FolderIndex) -> int:
    """1 when the first image of every class is grayscale, else 3 (--channels overrides)."""
    first = {}
    for path, label in zip(index.train.paths, index.train.labels):
        first.setdefault(int(label), path)
    modes = check_images(list(first.values()), False, None)
    return 1 if all(mode in GRAYSCALE_MODES for mode in modes) else 3


# --- one image: decode, augment ------------------------------------------------------

def random_resized_crop_box(rng: np.random.Generator, width: int, height: int,
                            scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop draw: (left, top, width, height) of a crop covering
    ``scale`` of the area with aspect ratio in ``ratio``; a centre crop after 10 misses."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        crop_width = int(round(math.sqrt(target_area * aspect)))
        crop_height = int(round(math.sqrt(target_area / aspect)))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            top = int(rng.integers(0, height - crop_height + 1))
            left = int(rng.integers(0, width - crop_width + 1))
            return left, top, crop_width, crop_height
    in_ratio = width / height
    if in_ratio < ratio[0]:
        crop_width, crop_height = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        crop_width, crop_height = int(round(height * ratio[1])), height
    else:
        crop_width, crop_height = width, height
    return (width - crop_width) // 2, (height - crop_height) // 2, crop_width, crop_height


def centre_crop_box(width: int, height: int, size: int) -> tuple[float, float, float, float]:
    """The box (in source pixels) that resizing the shorter side to size / 0.875 and
    centre-cropping ``size`` keeps: one resample, as torchvision's Resize + CenterCrop
    would produce up to rounding."""
    side = min(width, height) * EVAL_RESIZE_RATIO
    return (width - side) / 2, (height - side) / 2, side, side


@dataclass(frozen=True)
class ImageTransform:
    """How one file becomes one uint8 (channels, size, size) sample."""
    size: int
    channels: int
    augment: bool  # training draw: random-resized crop + horizontal flip; else resize + centre crop
    seed: int = 0

    def load(self, path: str, index: int, epoch: int) -> np.ndarray:
        """The sample as the model sees it: ``read``'s pixels, mirrored when drawn so."""
        pixels, flip = self.read(path, index, epoch)
        return pixels[..., ::-1] if flip else pixels

    def read(self, path: str, index: int, epoch: int) -> tuple[np.ndarray, bool]:
        """(uint8 (C, size, size) pixels of this sample's crop, whether to mirror them): the
        mirroring is left to whoever normalises the batch (the device, or normalise())."""
        from PIL import Image

        mode = "L" if self.channels == 1 else "RGB"
        with Image.open(path) as image:
            left, top, width, height, flip = self.crop(*image.size, index, epoch)
            box = (left, top, left + width, top + height)
            if image.format == "JPEG":
                box = self._draft(image, mode, box)
            # Gray to RGB only copies a channel: cheaper after the resize.
            if image.mode != mode and not (image.mode == "L" and mode == "RGB"):
                image = image.convert(mode)
            image = image.resize((self.size, self.size), Image.Resampling.BILINEAR, box=box)
        if image.mode != mode:  # convert() copies even when the mode is already right
            image = image.convert(mode)
        pixels = np.asarray(image, dtype=np.uint8)
        return (pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)), flip

    def crop(self, width: int, height: int, index: int, epoch: int) -> tuple:
        """(left, top, width, height, flip) of this sample's view of a width x height image."""
        if not self.augment:
            return (*centre_crop_box(width, height, self.size), False)
        rng = np.random.default_rng([self.seed, epoch, index])
        return (*random_resized_crop_box(rng, width, height), bool(rng.random() < 0.5))

    def _draft(self, image, mode: str, box: tuple) -> tuple:
        """Let libjpeg decode at 1/2, 1/4 or 1/8 scale when the crop keeps at least ``size``
        pixels a side (far less work for large photos and small crops); the crop box in the
        smaller image's pixels."""
        full_width, full_height = image.size
        scale = max(1e-9, min((box[2] - box[0]) / self.size, (box[3] - box[1]) / self.size))
        image.draft(mode, (math.ceil(full_width / scale), math.ceil(full_height / scale)))
        x_scale, y_scale = image.size[0] / full_width, image.size[1] / full_height
        return box[0] * x_scale, box[1] * y_scale, box[2] * x_scale, box[3] * y_scale


def pixel_normalisation(channels: int) -> Normalisation:
    """ImageNet's statistics (grayscale: their mean) as the scale and shift of uint8 pixels."""
    mean, std = (GRAY_MEAN, GRAY_STD) if channels == 1 else (RGB_MEAN, RGB_STD)
    return Normalisation.from_mean_std(mean, std)


def normalise(batch: np.ndarray, channels: int, out: Optional[np.ndarray] = None) -> np.ndarray:
    """uint8 (N, C, H, W) -> float32 scaled to [0, 1], minus the mean, over the std per
    channel; written into ``out`` when given (one pass, no temporaries)."""
    return batches.normalise(batch, pixel_normalisation(channels), out)


# --- checking files before training --------------------------------------------------

@contextlib.contextmanager
def decompression_bombs_refused() -> Iterator[None]:
    """Pillow warns from 89 M pixels on and refuses twice that: refuse from the warning on."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        yield


def describe_problem(error: BaseException) -> str:
    text = getattr(error, "strerror", None) or str(error) or type(error).__name__
    return f"{type(error).__name__}: {text}"


def check_image(path: str, full: bool) -> tuple[Optional[str], str]:
    """(problem or None, mode) of one file: its header (and with ``full`` its pixels) must decode."""
    from PIL import Image

    try:
        with decompression_bombs_refused():
            with Image.open(path) as image:
                mode = image.mode
                if full:
                    image.load()
        return None, mode
    except Exception as error:  # noqa: BLE001 - every failure names the file
        return describe_problem(error), ""


def bad_image_message(path: str, problem: str) -> str:
    return (f"folder dataset: {path} is not a readable image ({problem}); replace or remove it "
            "(or pass --skip-bad-images to train on without it)")


# --- worker processes ---------------------------------------------------------------------

def _become_worker() -> None:
    """Pool initializer: die with the rank, and leave signals sent to the whole job
    (Ctrl-C, Slurm's SIGUSR1 before preemption) to the rank."""
    for name in ("SIGINT", "SIGUSR1", "SIGUSR2", "SIGHUP"):
        signal.signal(getattr(signal, name), signal.SIG_IGN)
    try:  # Linux: end when the rank ends, however it ends
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def decode_samples(paths: Sequence[str], transform: ImageTransform, indices: Sequence[int],
                   epoch: int, skip_bad: bool, out: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray, list]:
    """uint8 samples of files ``paths`` (sample numbers ``indices``), unmirrored, in ``out`` if
    given; whether each is to be mirrored; and the (path, problem) of each unreadable one:
    with ``skip_bad`` a blank sample takes its place, else the first one stops the job
    (RankUsageError)."""
    shape = (len(paths), transform.channels, transform.size, transform.size)
    out = np.empty(shape, dtype=np.uint8) if out is None else out[:len(paths)]
    flips = np.zeros(len(paths), dtype=bool)
    bad = []
    for slot, (path, index) in enumerate(zip(paths, indices)):
        try:
            with decompression_bombs_refused():
                out[slot], flips[slot] = transform.read(path, int(index), epoch)
        except Exception as error:  # noqa: BLE001 - named and counted, or the job stops on it
            if not skip_bad:
                raise RankUsageError(bad_image_message(path, describe_problem(error))) from None
            out[slot] = 0
            bad.append((path, describe_problem(error)))
    return out, flips, bad


_attached: dict = {}  # a worker's view of the rank's shared blocks, by name


def _decode_into_block(block_name: str, paths, transform: ImageTransform, indices, epoch: int,
                       skip_bad: bool) -> tuple[np.ndarray, list]:
    """In a worker: decode into the rank's shared-memory block ``block_name`` (nothing
    but the flips and the list of bad files travels back through the pipe)."""
    if block_name not in _attached:
        from multiprocessing import shared_memory
        # Attaching registers the block with the resource tracker a second time; spawned
        # workers share the rank's tracker, so that is a no-op and the rank's unlink holds.
        _attached[block_name] = shared_memory.SharedMemory(block_name)
    buffer = np.ndarray((SAMPLES_PER_TASK, transform.channels, transform.size, transform.size), np.uint8,
                        buffer=_attached[block_name].buf)
    _, flips, bad = decode_samples(paths, transform, indices, epoch, skip_bad, buffer)
    return flips, bad


def _check_task(paths: Sequence[str], full: bool) -> list:
    return [check_image(path, full) for path in paths]


class DecoderPool(ProcessPoolExecutor):
    """Decoder processes of one rank: fresh interpreters (spawned, never forked: forking an
    MPI rank that runs framework threads is unsafe), started once and kept for the run."""

    def __init__(self, workers: int):
        import multiprocessing
        super().__init__(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_become_worker)
        self.workers = workers


def start_workers(workers: int) -> Optional[DecoderPool]:
    """``workers`` decoder processes, or None to decode in the rank itself."""
    return DecoderPool(workers) if workers > 0 else None


def check_images(paths: Sequence[str], full: bool, pool: Optional[DecoderPool]) -> list:
    """Modes of the images ``paths``; RankUsageError naming the first file that fails."""
    chunks = [paths[start:start + 64] for start in range(0, len(paths), 64)]
    if pool is None:
        results = [_check_task(chunk, full) for chunk in chunks]
    else:
        results = pool.map(_check_task, chunks, [full] * len(chunks))
    modes = []
    for chunk, outcomes in zip(chunks, results):
        for path, (problem, mode) in zip(chunk, outcomes):
            if problem:
                raise RankUsageError(bad_image_message(path, problem))
            modes.append(mode)
    return modes


# --- the stream ------------------------------------------------------------------------------

class _Blocks:
    """Shared-memory blocks of SAMPLES_PER_TASK uint8 samples: workers decode into them and
    the rank normalises straight out of them (no pickling of pixels), as PyTorch's
    DataLoader hands tensors over in shared memory. Reused; at most as many as tasks
    in flight, which the lookahead bounds."""

    def __init__(self, sample_shape: tuple):
        self.sample_shape, self.free, self.every = sample_shape, [], []

    def take(self):
        if not self.free:
            from multiprocessing import shared_memory
            size = SAMPLES_PER_TASK * int(np.prod(self.sample_shape))
            self.every.append(shared_memory.SharedMemory(create=True, size=size))
            self.free.append(self.every[-1])
        return self.free.pop()

    def give_back(self, block) -> None:
        self.free.append(block)

    def view(self, block, count: int) -> np.ndarray:
        return np.ndarray((SAMPLES_PER_TASK, *self.sample_shape), np.uint8, buffer=block.buf)[:count]

    def close(self) -> None:
        for block in self.every:
            block.close()
            block.unlink()
        self.every, self.free = [], []


@dataclass
class _Task:
    """One block of samples on its way: its decode (a Future, or the result when decoded in
    the rank), its shared block (None in the rank), how many of its samples are consumed."""
    pending: object
    block: object
    count: int
    used: int = 0
    samples: Optional[np.ndarray] = None
    flips: Optional[np.ndarray] = None


class StreamedImages:
    """An image set read from disk, indexed like the arrays of the in-memory datasets:
    ``images[indices]`` is a float32 (N, C, H, W) batch; ``read_into(indices, out)`` puts
    the uint8 pixels in ``out`` and returns which samples to mirror (the input path that
    leaves normalising and mirroring to the device).

    ``plan(order, epoch)`` announces the order in which this rank will ask for samples;
    from the first request on, worker processes decode up to ``lookahead`` samples
    ahead of it (at least two blocks per worker), so memory is bounded by the lookahead,
    not by the dataset. A request off the plan is decoded on demand (same bytes).
    """

    def __init__(self, paths: Sequence[str], transform: ImageTransform, pool: Optional[DecoderPool],
                 skip_bad: bool = False, log=print):
        self.paths, self.transform, self.pool, self.skip_bad, self.log = tuple(paths), transform, pool, skip_bad, log
        self.shape = (len(self.paths), transform.channels, transform.size, transform.size)
        self.dtype = np.dtype(np.float32)
        self.pixel_dtype = np.dtype(np.uint8)
        self.normalisation = pixel_normalisation(transform.channels)
        self.blocks = _Blocks(self.shape[1:])
        self.skipped = 0
        self.pending: deque = deque()
        self.plan(np.arange(0), 0)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def workers(self) -> int:
        return self.pool.workers if self.pool is not None else 0

    def plan(self, order, epoch: int, lookahead: int = 256) -> None:
        self._drop_pending()
        self.order, self.epoch = np.asarray(order, dtype=np.int64), epoch
        self.lookahead = max(1, lookahead, 2 * self.workers * SAMPLES_PER_TASK)
        self.consumed = self.submitted = 0

    def __getitem__(self, key) -> np.ndarray:
        indices = np.arange(len(self))[key] if isinstance(key, slice) else np.asarray(key, dtype=np.int64)
        pixels = np.empty((len(indices), *self.shape[1:]), dtype=np.uint8)
        flips = self.read_into(indices, pixels)
        return batches.normalise(batches.apply_flips(pixels, flips), self.normalisation)

    def read_into(self, indices: np.ndarray, out: np.ndarray) -> np.ndarray:
        """The uint8 pixels of ``indices`` (unmirrored) into ``out``; which to mirror."""
        indices = np.asarray(indices, dtype=np.int64)
        flips = np.zeros(len(indices), dtype=bool)
        end = self.consumed + len(indices)
        if end <= len(self.order) and np.array_equal(self.order[self.consumed:end], indices):
            self._take_into(out, flips)
        else:
            self._decode_now(indices, out, flips)
        return flips

    def read_encoded(self, indices: np.ndarray) -> list:
        """--decode gpu: each sample's file bytes and crop for the device to decode (files it
        cannot decode come decoded, as the CPU path decodes them); common/jpeg.py."""
        samples = []
        for index in np.asarray(indices, dtype=np.int64):
            path = self.paths[index]
            try:
                with decompression_bombs_refused():
                    samples.append(jpeg.encoded_sample(path, self.transform, int(index), self.epoch))
            except Exception as error:  # noqa: BLE001 - named and counted, or the job stops on it
                if not self.skip_bad:
                    raise RankUsageError(bad_image_message(path, describe_problem(error))) from None
                self._note_skipped(path, describe_problem(error))
                samples.append(jpeg.HostDecoded(np.zeros(self.shape[1:], dtype=np.uint8), False))
        return samples

    def close(self) -> None:
        """Stop the decoders, free the shared blocks and the pool's semaphores (a run ended
        by os._exit, as an aborted MPI job is, would leave them to the resource tracker)."""
        self._drop_pending()
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None
        self.blocks.close()

    # -- internals --

    def _take_into(self, out: np.ndarray, flips: np.ndarray) -> None:
        filled = 0
        while filled < len(out):
            self._fill(self.consumed + len(out) - filled)
            task = self.pending[0]
            samples = self._samples(task)
            part = min(len(out) - filled, task.count - task.used)
            out[filled:filled + part] = samples[task.used:task.used + part]
            flips[filled:filled + part] = task.flips[task.used:task.used + part]
            task.used += part
            filled += part
            self.consumed += part
            if task.used == task.count:
                self._release(self.pending.popleft())
        self._fill(self.consumed)

    def _fill(self, must_reach: int) -> None:
        """Submit blocks until ``lookahead`` samples past the consumer (and at least up
        to ``must_reach``) are on their way."""
        limit = min(len(self.order), max(must_reach, self.consumed + self.lookahead))
        while self.submitted < limit:
            indices = self.order[self.submitted:min(self.submitted + SAMPLES_PER_TASK, len(self.order))]
            self.pending.append(self._submit(indices))
            self.submitted += len(indices)

    def _submit(self, indices: np.ndarray) -> _Task:
        paths = [self.paths[index] for index in indices]
        if self.pool is None:
            return _Task(decode_samples(paths, self.transform, indices, self.epoch, self.skip_bad), None,
                         len(indices))
        block = self.blocks.take()
        future = self.pool.submit(_decode_into_block, block.name, paths, self.transform, indices, self.epoch,
                                  self.skip_bad)
        return _Task(future, block, len(indices))

    def _samples(self, task: _Task) -> np.ndarray:
        """The task's uint8 samples, once decoded (waiting for them if need be)."""
        if task.samples is None:
            if task.block is None:
                task.samples, task.flips, bad = task.pending
            else:
                task.flips, bad = task.pending.result()
                task.samples = self.blocks.view(task.block, task.count)
            for path, problem in bad:
                self._note_skipped(path, problem)
        return task.samples

    def _note_skipped(self, path: str, problem: str) -> None:
        self.skipped += 1
        self.log(f"skipped unreadable image {path} ({problem}); a blank image takes its place "
                 f"({self.skipped} so far)")

    def _release(self, task: _Task) -> None:
        if task.block is not None:
            self.blocks.give_back(task.block)

    def _decode_now(self, indices: np.ndarray, out: np.ndarray, flips: np.ndarray) -> None:
        tasks = [self._submit(indices[start:start + SAMPLES_PER_TASK])
                 for start in range(0, len(indices), SAMPLES_PER_TASK)]
        try:
            for number, task in enumerate(tasks):
                start = number * SAMPLES_PER_TASK
                out[start:start + task.count] = self._samples(task)
                flips[start:start + task.count] = task.flips
        finally:
            self._forget(tasks)

    def _drop_pending(self) -> None:
        self._forget(self.pending)
        self.pending.clear()

    def _forget(self, tasks) -> None:
        """Tasks no longer wanted: a block may be reused only once no worker writes to it."""
        for task in tasks:
            if task.block is None:
                continue
            if not task.pending.cancel():
                try:
                    task.pending.result()
                except Exception:  # noqa: BLE001 - a bad image nobody will read any more
                    pass
            self._release(task)
