"""The TensorFlow end of the input path (common/data/batches.py): batches reach the device as bytes.

The prefetch thread reads each batch's uint8 pixels and copies them to the
rank's GPU (TensorFlow's own host-to-device copy, started from that thread: the
prefetch to the GPU happens while the current step trains); a compiled function
then mirrors and normalises them there and transposes them to NHWC. On a CPU
the same function gives exactly ``common.data.batches.reference_inputs``, transposed.

--decode gpu is PyTorch's (nvJPEG through torchvision): TensorFlow's JPEG
decoder has no GPU kernel.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import tensorflow as tf

from common.core.errors import UsageError
from common.core.metrics import IGNORED_LABEL
from common.data.batches import Batch, Normalisation


class TfSums:
    """A step's (loss sum, correct, count) as a float64 tensor, read later."""

    def __init__(self, sums):
        self.sums = sums

    def resolve(self) -> np.ndarray:
        return np.asarray(self.sums.numpy(), dtype=np.float64)


def loss_sum_and_correct(labels, logits):
    """The summed cross-entropy and the correct count of float32 ``logits``, leaving out the
    IGNORED_LABEL samples (TensorFlow's loss has no ignore index: it refuses such labels)."""
    labels = tf.convert_to_tensor(labels)
    scored = tf.not_equal(labels, IGNORED_LABEL)
    losses = tf.nn.sparse_softmax_cross_entropy_with_logits(tf.where(scored, labels, tf.zeros_like(labels)), logits)
    correct = tf.logical_and(scored, tf.equal(tf.argmax(logits, 1, output_type=labels.dtype), labels))
    return (tf.reduce_sum(tf.where(scored, losses, tf.zeros_like(losses))),
            tf.reduce_sum(tf.cast(correct, tf.float32)))


class DeviceMeter:
    """(loss sum, correct, count) kept as tensors: adding a chunk's results does not wait for it."""

    def __init__(self):
        self.sums = tf.zeros(3, dtype=tf.float64)

    def add(self, loss_sum, correct, count: int) -> None:
        self.sums += tf.stack([tf.cast(loss_sum, tf.float64), tf.cast(correct, tf.float64),
                               tf.constant(float(count), tf.float64)])

    def pending(self) -> TfSums:
        return TfSums(self.sums)


class TfFeed:
    """common.data.batches.Feed for one device: host buffers, the copy to the device, and the
    NHWC float32 model inputs made there."""

    def __init__(self, device: str, normalisation: Normalisation):
        self.device = device  # "cpu" or a GPU's name (train_tf/device.py)
        self.on_gpu = device != "cpu"
        scale, shift = normalisation.arrays()
        self.scale, self.shift = tf.constant(scale), tf.constant(shift)
        self._inputs = tf.function(lambda pixels, flips: tf.transpose(self._normalised(pixels, flips), [0, 2, 3, 1]),
                                   reduce_retracing=True)  # NCHW (common/) -> NHWC (Keras)
        self._inputs_nchw = tf.function(self._normalised, reduce_retracing=True)

    def host_buffer(self, shape: tuple, dtype) -> np.ndarray:
        return np.empty(shape, dtype=dtype)

    def stage(self, batch: Batch) -> Batch:
        if batch.encoded is not None:
            raise UsageError("--decode gpu is PyTorch's (nvJPEG through torchvision); use --decode cpu with "
                             "TensorFlow")
        with tf.device(self._placement()):
            return replace(batch, labels=self._copy(batch.labels), pixels=self._copy(batch.pixels),
                           flips=self._copy(batch.flips))

    def _placement(self) -> str:
        return "/CPU:0" if self.device == "cpu" else "/GPU:0"  # the one GPU pin_gpu left visible

    @staticmethod
    def _copy(array: np.ndarray | None):
        return None if array is None else tf.identity(tf.constant(np.ascontiguousarray(array)))

    def arrive(self, batch: Batch) -> Batch:
        return batch  # TensorFlow orders its copies before the ops that read them

    def inputs(self, batch: Batch):
        """NHWC float32 model inputs (Keras' layout)."""
        return self._inputs(batch.pixels, self._flips(batch))

    def inputs_channels_first(self, batch: Batch):
        """NCHW float32, the layout pipeline stages exchange."""
        return self._inputs_nchw(batch.pixels, self._flips(batch))

    @staticmethod
    def _flips(batch: Batch):
        return batch.flips if batch.flips is not None else tf.zeros([batch.count], tf.bool)

    def _normalised(self, pixels, flips):
        """Pixels mirrored where drawn, then * scale - shift (two operations, as
        common.data.batches.normalise computes them)."""
        x = tf.cast(pixels, tf.float32)
        x = tf.where(tf.reshape(flips, [-1, 1, 1, 1]), tf.reverse(x, axis=[3]), x)
        return tf.subtract(tf.multiply(x, self.scale), self.shift)

    def labels(self, batch: Batch):
        """The batch's labels, blank samples' (--skip-bad-images) IGNORED_LABEL."""
        if batch.blank is None:
            return batch.labels
        return tf.where(tf.constant(batch.blank), tf.constant(IGNORED_LABEL, batch.labels.dtype), batch.labels)


def make_feed(config, device: str, dataset) -> TfFeed:
    if config.decode == "gpu":
        raise UsageError("--decode gpu is PyTorch's (nvJPEG through torchvision): TensorFlow's JPEG decoder "
                         "runs on the CPU; use --decode cpu, or train_torch/main.py")
    return TfFeed(device, dataset.normalisation)
