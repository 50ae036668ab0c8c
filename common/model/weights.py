"""A framework-neutral weight layout: per layer spec, a dict of numpy arrays.

Canonical layout is channel-first, as PyTorch stores it:
  conv kernel (out, in, kh, kw), dense kernel (out, in), flatten in (C, H, W)
order. BatchNorm carries gamma, beta, mean, var. The framework folders convert
to and from their own layouts (TensorFlow: conv (kh, kw, in, out), dense
(in, out)); nothing here imports either framework.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from common.model import networks

BN_KEYS = ("gamma", "beta", "mean", "var")


def layer_parts(spec: networks.Spec, in_shape: tuple) -> list[tuple]:
    """Parameterised parts of one layer: [(name, part_spec, part_input_shape)]."""
    if isinstance(spec, networks.BLOCKS):
        return spec.parts(in_shape)
    if isinstance(spec, (networks.Conv, networks.ConvBN, networks.Dense)):
        return [("", spec, in_shape)]
    return []


def _prefixed_parts(specs, input_shape):
    shapes = networks.layer_shapes(specs, input_shape)
    for index, spec in enumerate(specs):
        for name, part, part_in in layer_parts(spec, shapes[index]):
            yield f"{index}.{name + '.' if name else ''}", part, part_in


def expected_shapes(specs: Sequence[networks.Spec], input_shape: tuple) -> dict[str, tuple]:
    """{key: shape} of every array a full model's layout holds (what a checkpoint must match)."""
    shapes = {}
    for prefix, part, part_in in _prefixed_parts(specs, input_shape):
        if isinstance(part, networks.Dense):
            shapes.update({prefix + "kernel": (part.units, part_in[0]), prefix + "bias": (part.units,)})
            continue
        if isinstance(part, networks.ConvBN):
            shapes[prefix + "conv.kernel"] = part.kernel_shape(part_in)
            if part.bias:
                shapes[prefix + "conv.bias"] = (part.filters,)
            shapes.update({prefix + "bn." + key: (part.filters,) for key in BN_KEYS})
        else:
            kernel = (part.filters, part_in[0], part.kernel, part.kernel)
            shapes.update({prefix + "kernel": kernel, prefix + "bias": (part.filters,)})
    return shapes


def expected_keys(specs: Sequence[networks.Spec], input_shape: tuple) -> list[str]:
    """Every array name a full model's layout holds, e.g. '3.first.conv.kernel'."""
    return list(expected_shapes(specs, input_shape))


BN_STATISTICS = ("bn.mean", "bn.var")  # the keys' endings of BatchNorm's running statistics


def is_batch_norm_statistic(key: str) -> bool:
    return key.endswith(BN_STATISTICS)


def layer_keys(keys: Iterable[str], start: int, end: int) -> list[str]:
    """The keys of layers start..end-1 among a whole model's ``keys``."""
    return [key for key in keys if start <= _layer_index(key) < end]


def conv_kernel_to_tf(kernel: np.ndarray) -> np.ndarray:
    return np.transpose(kernel, (2, 3, 1, 0))


def conv_kernel_from_tf(kernel: np.ndarray) -> np.ndarray:
    return np.transpose(kernel, (3, 2, 0, 1))


def dense_kernel_to_tf(kernel: np.ndarray) -> np.ndarray:
    return np.transpose(kernel)


dense_kernel_from_tf = dense_kernel_to_tf


def depthwise_kernel_to_tf(kernel: np.ndarray) -> np.ndarray:
    """(C, 1, kh, kw) -> Keras DepthwiseConv2D's (kh, kw, C, 1); its own inverse."""
    return np.transpose(kernel, (2, 3, 0, 1))


depthwise_kernel_from_tf = depthwise_kernel_to_tf


def _fan_in_uniform(rng, shape, fan_in):
    # PyTorch's default for Conv2d/Linear weights and biases: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    bound = 1.0 / np.sqrt(fan_in)
    return rng.uniform(-bound, bound, size=shape).astype(np.float32)


# BatchNorm starts as the identity (PyTorch's and Keras' defaults).
BN_INITIAL = {"bn.gamma": 1.0, "bn.beta": 0.0, "bn.mean": 0.0, "bn.var": 1.0}


def initial_weights(specs: Sequence[networks.Spec], input_shape: tuple, seed: int) -> dict[str, np.ndarray]:
    """Seeded initial weights in the neutral layout, the same for both frameworks."""
    rng = np.random.default_rng([seed, 0xC0FFEE])
    arrays, fan_in = {}, 1
    for key, shape in expected_shapes(specs, input_shape).items():
        constant = next((value for name, value in BN_INITIAL.items() if key.endswith("." + name)), None)
        if constant is not None:
            arrays[key] = np.full(shape, constant, np.float32)
            continue
        if key.endswith("kernel"):
            fan_in = int(np.prod(shape[1:]))  # (out, in) or (out, in, kh, kw); its bias follows it
        arrays[key] = _fan_in_uniform(rng, shape, fan_in)
    return arrays


def _layer_index(key):
    return int(key.split(".", 1)[0])


def shift_keys(arrays: dict, offset: int) -> dict:
    """Renumber layer indices: a stage's local keys <-> the whole model's keys."""
    return {f"{_layer_index(key) + offset}.{key.split('.', 1)[1]}": value for key, value in arrays.items()}


def stage_arrays(arrays: dict, start: int, end: int) -> dict:
    """The arrays of layers start..end-1 of a whole model, keyed as that stage's own."""
    return shift_keys({key: value for key, value in arrays.items() if start <= _layer_index(key) < end},
                      -start)
