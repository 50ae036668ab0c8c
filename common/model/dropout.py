"""Dropout masks as a pure function of (seed, epoch, global sample index, layer, feature).

A framework's own dropout draws from a per-process random stream, so two ranks
sharing a batch, or a pipeline's micro-batches, or TensorFlow against PyTorch,
would drop different units and no mode would compute what one process
computes. Here each sample's mask is hashed from where the sample is: the run's
seed, the epoch and the sample's index in the training set (what
common/data/datasets.rank_batches hands every rank), then the layer and the
feature. Whichever rank, micro-batch or framework holds the sample draws the
same mask, and a stage that recomputes its forward (TensorFlow's pipeline
stages) draws it again unchanged.

The hash is integer arithmetic both frameworks do exactly: values below 2**32
held in int64, multiplied by constants below 2**31 (so no product overflows),
masked with ``% 2**32`` and shifted with ``// 2**k``. Only XOR differs between
numpy, torch and TensorFlow, so ``mix32`` takes it as an argument. The keep
test compares 24 hash bits with an integer threshold, and a kept value is
multiplied by one float32 scale, so the masked tensors agree bit for bit.
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import numpy as np

WORD = 1 << 32
MULTIPLIERS = (0x7FEB352D, 0x5BD1E995)  # below 2**31: a 32-bit value times one fits in int64
SAMPLE_SALT = 0x3C6EF372
LAYER_SALT = 0x1B873593
DRAW_BITS = 24  # the hash bits compared with the threshold (exact in float32 too)


def mix32(x, xor: Callable = operator.xor):
    """A 32-bit avalanche hash of each element of ``x`` (int64, values in [0, 2**32))."""
    x = xor(x, x // (1 << 16))
    x = (x * MULTIPLIERS[0]) % WORD
    x = xor(x, x // (1 << 15))
    x = (x * MULTIPLIERS[1]) % WORD
    return xor(x, x // (1 << 16))


def sample_keys(seed: int, epoch: int, indices: np.ndarray) -> np.ndarray:
    """One int64 key per sample (its index in the training set) for ``epoch``: what a
    framework's dropout layer hashes further with its layer and feature."""
    run = mix32(np.int64((seed % WORD) ^ SAMPLE_SALT))
    epoch_key = mix32(np.int64(int(run) ^ (epoch % WORD)))
    return mix32(np.asarray(indices, dtype=np.int64) % WORD ^ np.int64(epoch_key))


def layer_key(layer: int) -> int:
    """The salt of the model's ``layer``-th spec (its index in the whole model, any stage)."""
    return int(mix32(np.int64((layer * LAYER_SALT + 1) % WORD)))


def threshold(rate: float) -> int:
    """A unit is kept when its DRAW_BITS-bit draw is at least this."""
    return round(rate * (1 << DRAW_BITS))


def scale(rate: float) -> float:
    """What a kept unit is multiplied by (the float32 value both frameworks use)."""
    return float(np.float32(1.0 / (1.0 - rate)))


def keep(keys, feature_ids, layer: int, rate: float, xor: Callable = operator.xor):
    """Boolean (samples, features): which units survive. ``keys`` (samples,) from
    sample_keys and ``feature_ids`` (features,) int64 in the caller's framework."""
    salted = mix32(xor(keys, layer_key(layer)), xor)
    draws = mix32(mix32((salted[:, None] + feature_ids[None, :]) % WORD, xor), xor)
    return draws // (1 << (32 - DRAW_BITS)) >= threshold(rate)


def reference_mask(keys: np.ndarray, features: int, layer: int, rate: float) -> np.ndarray:
    """float32 (samples, features): 0 where dropped, ``scale(rate)`` where kept (numpy)."""
    kept = keep(np.asarray(keys, dtype=np.int64), np.arange(features, dtype=np.int64), layer, rate)
    return np.where(kept, np.float32(scale(rate)), np.float32(0)).astype(np.float32)
