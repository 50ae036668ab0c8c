"""Batches as they travel from the dataset to a framework: pixels as bytes, read ahead.

A dataset's images are held (or decoded) as uint8 pixels with one affine
normalisation per channel, ``float = pixel * scale - shift``, and the
horizontal flips of the augmentation are a flag per sample. A ``Batch`` carries
exactly that, so the host sends a quarter of the bytes a float32 batch would
need and the framework normalises and flips on its device. ``reference_inputs``
is the same arithmetic in numpy: the float32 inputs the device must reproduce,
bit for bit (float32 multiply, then subtract; a flip only moves values).

The ``Prefetcher`` reads a rank's batches of an epoch in a background thread,
in training order, and hands each to the framework's feed as soon as it is
read (which starts its copy to the device), so the next batch is on its way
while the current one trains.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import numpy as np


@dataclass(frozen=True)
class Normalisation:
    """Per-channel ``float = pixel * scale - shift`` (float32)."""
    scale: tuple
    shift: tuple

    @classmethod
    def from_mean_std(cls, mean: Sequence[float] | np.ndarray, std: Sequence[float] | np.ndarray,
                      peak: float = 255.0) -> Normalisation:
        """(pixel / peak - mean) / std, as one multiply and one subtract."""
        return cls(tuple(float(np.float32(1 / (peak * s))) for s in std),
                   tuple(float(np.float32(m / s)) for m, s in zip(mean, std)))

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(scale, shift) as float32 (1, C, 1, 1), to broadcast over an NCHW batch."""
        return (np.asarray(self.scale, dtype=np.float32).reshape(1, -1, 1, 1),
                np.asarray(self.shift, dtype=np.float32).reshape(1, -1, 1, 1))


def normalise(pixels: np.ndarray, normalisation: Normalisation, out: np.ndarray | None = None) -> np.ndarray:
    """(N, C, H, W) pixels -> float32 by ``normalisation``, into ``out`` when given (one pass)."""
    out = np.empty(pixels.shape, dtype=np.float32) if out is None else out
    scale, shift = normalisation.arrays()
    np.multiply(pixels, scale, out=out)
    return np.subtract(out, shift, out=out)


def apply_flips(pixels: np.ndarray, flips: np.ndarray | None) -> np.ndarray:
    """Mirror the samples whose flag is set (a copy when any is)."""
    if flips is None or not flips.any():
        return pixels
    flipped = pixels.copy()
    flipped[flips] = pixels[flips][..., ::-1]
    return flipped


@dataclass(frozen=True)
class Batch:
    """One rank's samples of a step (or of an evaluation batch).

    ``pixels`` and ``labels`` are numpy arrays as read, or the framework's tensors
    once its feed has staged them; either is None on a rank that does not need it
    (a pipeline's middle stages read neither). ``flips`` marks the samples to mirror
    (None: none). ``encoded`` holds undecoded files for --decode gpu instead of pixels.
    ``epoch`` is the training epoch the batch belongs to (None: an evaluation batch);
    with ``indices`` it keys the seeded dropout masks (common/model/dropout.py). ``blank``
    marks the samples left blank because their files could not be read (--skip-bad-images;
    None: none): they carry no loss and are not scored."""
    indices: np.ndarray
    labels: Any = None             # numpy as read, a framework tensor once staged
    pixels: Any = None
    flips: Any = None
    encoded: Any = None
    staged: Any = None             # what the feed keeps while the batch travels (events, buffers)
    epoch: int | None = None
    blank: np.ndarray | None = None

    @property
    def scored(self) -> int:
        """The samples whose loss and accuracy count: all but the blank ones."""
        return self.count - (int(self.blank.sum()) if self.blank is not None else 0)

    @property
    def count(self) -> int:
        return len(self.indices)

    def part(self, start: int, stop: int) -> Batch:
        """Samples start..stop-1 (a micro-batch or an accumulation chunk); views, not copies."""
        def cut(value):
            return None if value is None else value[start:stop]
        return replace(self, indices=self.indices[start:stop], labels=cut(self.labels), pixels=cut(self.pixels),
                       flips=cut(self.flips), encoded=cut(self.encoded), blank=cut(self.blank))

    def parts(self, count: int) -> list[Batch]:
        """``count`` near-equal consecutive parts, as np.array_split cuts (empty parts included)."""
        bounds = np.cumsum([0] + [len(piece) for piece in np.array_split(np.arange(self.count), count)])
        return [self.part(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def reference_inputs(batch: Batch, normalisation: Normalisation) -> np.ndarray:
    """The float32 (N, C, H, W) inputs a read batch stands for, computed on the host."""
    return normalise(apply_flips(batch.pixels, batch.flips), normalisation)


class ImageSource(Protocol):
    """A dataset's images (InMemoryImages, common/data/decoders.StreamedImages), indexable like an
    array: ``images[indices]`` is float32 NCHW, the host's model inputs."""

    shape: tuple
    pixel_dtype: np.dtype
    normalisation: Normalisation

    def __len__(self) -> int: ...

    def __getitem__(self, key) -> np.ndarray: ...

    def read_into(self, indices: np.ndarray, out: np.ndarray) -> np.ndarray | None:
        """The pixels of ``indices`` into ``out``; which samples to mirror (None: none)."""

    def blanked(self, indices: np.ndarray) -> np.ndarray | None:
        """Which of these samples, once read, were left blank (unreadable); None: none."""


class InMemoryImages:
    """A small dataset's images, held as uint8 pixels with the normalisation that makes
    them model inputs."""

    def __init__(self, pixels: np.ndarray, normalisation: Normalisation):
        self.pixels, self.normalisation = pixels, normalisation
        self.shape, self.pixel_dtype = pixels.shape, pixels.dtype
        self.dtype = np.dtype(np.float32)

    def __len__(self) -> int:
        return len(self.pixels)

    def __getitem__(self, key) -> np.ndarray:
        pixels = self.pixels[key]
        if pixels.ndim == 3:  # one sample
            return normalise(pixels[None], self.normalisation)[0]
        return normalise(pixels, self.normalisation)

    def read_into(self, indices: np.ndarray, out: np.ndarray) -> None:
        np.take(self.pixels, indices, axis=0, out=out)
        return None  # no augmentation: nothing to flip

    def blanked(self, indices: np.ndarray) -> None:
        return None  # held in memory: every image was read at load


@dataclass(frozen=True)
class Reads:
    """What a rank needs of each batch: the pipeline's first stage reads images, its last
    the labels; a data-parallel replica both; a parameter server neither."""
    images: bool
    labels: bool


class Feed(Protocol):
    """A framework's side of the input path (train_torch/input.py, train_tf/input.py)."""

    on_gpu: bool  # whether the rank computes on a GPU

    def host_buffer(self, shape: tuple, dtype) -> np.ndarray:
        """Where a batch's pixels are read into (page-locked memory on a GPU)."""

    def stage(self, batch: Batch) -> Batch:
        """Start moving a read batch to the device (called from the prefetch thread)."""


class BatchReader:
    """Reads the parts of a set's batches a rank needs (``reads``) into its feed's buffers."""

    def __init__(self, images: ImageSource, labels: np.ndarray, reads: Reads, feed: Feed,
                 read_encoded: Callable[[np.ndarray], object] | None = None):
        self.images, self.labels, self.reads, self.feed = images, labels, reads, feed
        self.read_encoded = read_encoded  # --decode gpu: the files, for the feed to decode

    def read(self, indices: np.ndarray, epoch: int | None = None) -> Batch:
        """The batch of ``indices``, of training ``epoch`` (None: evaluation)."""
        labels = self.labels[indices] if self.reads.labels else None
        if not self.reads.images:
            return Batch(indices, labels, epoch=epoch)
        if self.read_encoded is not None:
            encoded = self.read_encoded(indices)
            return Batch(indices, labels, encoded=encoded, epoch=epoch, blank=self.images.blanked(indices))
        pixels = self.feed.host_buffer((len(indices), *self.images.shape[1:]), self.images.pixel_dtype)
        flips = self.images.read_into(indices, pixels)
        return Batch(indices, labels, pixels, flips, epoch=epoch, blank=self.images.blanked(indices))


class BlankCount:
    """Counts the blank samples (unreadable images, --skip-bad-images) of the batches it sees."""

    def __init__(self):
        self.total = 0

    def of(self, batch: Batch) -> Batch:
        self.total += batch.count - batch.scored
        return batch


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


_END = object()


class Prefetcher:
    """Reads ``steps`` (index arrays) in order in a thread, ``depth`` batches ahead of the
    consumer, each staged by ``stage`` as soon as it is read. ``next()`` returns them in
    order; the seconds it waited are the rank's data wait. A failure in the thread (an
    unreadable image) is raised by the ``next()`` that would have returned its batch."""

    def __init__(self, read: Callable[[np.ndarray], Batch], stage: Callable[[Batch], Batch],
                 steps: Sequence[np.ndarray], depth: int = 1):
        self.wait_seconds = 0.0
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(read, stage, list(steps)), daemon=True,
                                        name="batch prefetch")
        self._thread.start()

    def _run(self, read, stage, steps) -> None:
        try:
            for indices in steps:
                if self._stopping.is_set():
                    return
                self._put(stage(read(indices)))
        except BaseException as error:  # noqa: BLE001 - handed to the consumer, raised there
            self._put(_Failure(error))
            return
        self._put(_END)

    def _put(self, item) -> None:
        while not self._stopping.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def next(self) -> Batch:
        started = time.perf_counter()
        item = self._queue.get()
        self.wait_seconds += time.perf_counter() - started
        if isinstance(item, _Failure):
            self.close()
            raise item.error
        if item is _END:
            raise StopIteration
        return item

    def __iter__(self) -> Iterator[Batch]:
        while True:
            try:
                yield self.next()
            except StopIteration:
                return

    def close(self) -> None:
        """Stop reading (batches not yet taken are dropped) and wait for the thread."""
        self._stopping.set()
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.1)
            except queue.Empty:
                pass
        self._thread.join()
