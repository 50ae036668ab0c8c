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

import functools
import signal
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from common.core.errors import RankUsageError
from common.data import batches, jpeg
from common.data.image_checks import bad_image_message, decompression_bombs_refused, describe_problem
from common.data.transforms import ImageTransform, pixel_normalisation

if TYPE_CHECKING:
    from multiprocessing import shared_memory

SAMPLES_PER_TASK = 8


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


def decode_samples(paths: Sequence[str], transform: ImageTransform, indices: Sequence[int] | np.ndarray,
                   epoch: int, skip_bad: bool, out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, list]:
    """uint8 samples of files ``paths`` (sample numbers ``indices``), unmirrored, in ``out`` if
    given; whether each is to be mirrored; and the (index, path, problem) of each unreadable one:
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
            bad.append((int(index), path, describe_problem(error)))
    return out, flips, bad


@functools.cache
def _attached_block(block_name: str):
    """In a worker: its view of the rank's shared block ``block_name``, attached once.
    Attaching registers the block with the resource tracker a second time; spawned
    workers share the rank's tracker, so that is a no-op and the rank's unlink holds."""
    from multiprocessing import shared_memory

    return shared_memory.SharedMemory(block_name)


def _decode_into_block(block_name: str, paths, transform: ImageTransform, indices, epoch: int,
                       skip_bad: bool) -> tuple[np.ndarray, list]:
    """In a worker: decode into the rank's shared-memory block ``block_name`` (nothing
    but the flips and the list of bad files travels back through the pipe)."""
    buffer = np.ndarray((SAMPLES_PER_TASK, transform.channels, transform.size, transform.size), np.uint8,
                        buffer=_attached_block(block_name).buf)
    _, flips, bad = decode_samples(paths, transform, indices, epoch, skip_bad, buffer)
    return flips, bad


class DecoderPool(ProcessPoolExecutor):
    """Decoder processes of one rank: fresh interpreters (spawned, never forked: forking an
    MPI rank that runs framework threads is unsafe), started once and kept for the run."""

    def __init__(self, workers: int):
        import multiprocessing
        super().__init__(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_become_worker)
        self.workers = workers


def start_workers(workers: int) -> DecoderPool | None:
    """``workers`` decoder processes, or None to decode in the rank itself."""
    return DecoderPool(workers) if workers > 0 else None


class _Blocks:
    """Shared-memory blocks of SAMPLES_PER_TASK uint8 samples: workers decode into them and
    the rank normalises straight out of them (no pickling of pixels), as PyTorch's
    DataLoader hands tensors over in shared memory. Reused; at most as many as tasks
    in flight, which the lookahead bounds."""

    def __init__(self, sample_shape: tuple):
        self.sample_shape = sample_shape
        self.free: list[shared_memory.SharedMemory] = []
        self.every: list[shared_memory.SharedMemory] = []

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
    pending: Future | tuple[np.ndarray, np.ndarray, list]
    block: shared_memory.SharedMemory | None
    count: int
    used: int = 0
    samples: np.ndarray | None = None
    flips: np.ndarray | None = None


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

    def __init__(self, paths: Sequence[str], transform: ImageTransform, pool: DecoderPool | None,
                 skip_bad: bool = False, log=print):
        self.paths, self.transform, self.pool, self.skip_bad, self.log = tuple(paths), transform, pool, skip_bad, log
        self.shape = (len(self.paths), transform.channels, transform.size, transform.size)
        self.dtype = np.dtype(np.float32)
        self.pixel_dtype = np.dtype(np.uint8)
        self.normalisation = pixel_normalisation(transform.channels)
        self.blocks = _Blocks(self.shape[1:])
        self.skipped = 0
        self.unreadable: set[int] = set()  # samples found unreadable and left blank (skip_bad)
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
        cannot decode come decoded, as the CPU path decodes them); common/data/jpeg.py."""
        samples = []
        for index in np.asarray(indices, dtype=np.int64):
            path = self.paths[index]
            try:
                with decompression_bombs_refused():
                    samples.append(jpeg.encoded_sample(path, self.transform, int(index), self.epoch))
            except Exception as error:  # noqa: BLE001 - named and counted, or the job stops on it
                if not self.skip_bad:
                    raise RankUsageError(bad_image_message(path, describe_problem(error))) from None
                self._note_skipped(int(index), path, describe_problem(error))
                samples.append(jpeg.HostDecoded(np.zeros(self.shape[1:], dtype=np.uint8), False))
        return samples

    def blanked(self, indices: np.ndarray) -> np.ndarray | None:
        """Which of these samples (already read) were unreadable and left blank; None: none."""
        if not self.unreadable:
            return None
        blank = np.isin(indices, list(self.unreadable))
        return blank if blank.any() else None

    def close(self) -> None:
        """Stop the decoders, free the shared blocks and the pool's semaphores (a run ended
        by os._exit, as an aborted MPI job is, would leave them to the resource tracker)."""
        self.stop_decoders()
        self.blocks.close()

    def stop_decoders(self) -> None:
        """End the decoder processes (a request after this decodes in the rank itself)."""
        self._drop_pending()
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None

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
            if isinstance(task.pending, Future):
                assert task.block is not None  # a worker's decode goes into a shared block
                task.flips, bad = task.pending.result()
                task.samples = self.blocks.view(task.block, task.count)
            else:
                task.samples, task.flips, bad = task.pending
            for index, path, problem in bad:
                self._note_skipped(index, path, problem)
        return task.samples

    def _note_skipped(self, index: int, path: str, problem: str) -> None:
        self.skipped += 1
        self.unreadable.add(index)
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
