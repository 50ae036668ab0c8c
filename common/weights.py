"""A framework-neutral weight layout: per layer spec, a dict of numpy arrays.

Canonical layout is channel-first, as PyTorch stores it:
  conv kernel (out, in, kh, kw), dense kernel (out, in), flatten in (C, H, W)
order. BatchNorm carries gamma, beta, mean, var. The framework folders convert
to and from their own layouts (TensorFlow: conv (kh, kw, in, out), dense
(in, out)); nothing here imports either framework.
"""

import numpy as np

from common import models

CONV_KEYS = ("kernel", "bias")
BN_KEYS = ("gamma", "beta", "mean", "var")


def layer_parts(spec, in_shape):
    """Named parameterised parts of one layer: [(name, part_spec)]; the layout's skeleton."""
    if isinstance(spec, models.ResidualBlock):
        names = ("first", "second", "projection")
        return [(name, part) for name, (part, _) in zip(names, spec.parts(in_shape))]
    if isinstance(spec, (models.Conv, models.ConvBN, models.Dense)):
        return [("", spec)]
    return []


def expected_keys(specs, input_shape):
    """Every array name a full model's layout holds, e.g. '3.first.conv.kernel'."""
    keys = []
    shapes = models.layer_shapes(specs, input_shape)
    for index, spec in enumerate(specs):
        for name, part in layer_parts(spec, shapes[index]):
            prefix = f"{index}.{name + '.' if name else ''}"
            if isinstance(part, models.ConvBN):
                keys += [prefix + "conv.kernel"] + [prefix + "bn." + key for key in BN_KEYS]
            else:
                keys += [prefix + key for key in CONV_KEYS]
    return keys


def conv_kernel_to_tf(kernel):
    return np.transpose(kernel, (2, 3, 1, 0))


def conv_kernel_from_tf(kernel):
    return np.transpose(kernel, (3, 2, 0, 1))


def dense_kernel_to_tf(kernel):
    return np.transpose(kernel)


dense_kernel_from_tf = dense_kernel_to_tf


def save_npz(path, arrays):
    np.savez(path, **arrays)


def load_npz(path):
    with np.load(path) as archive:
        return {key: archive[key] for key in archive.files}
