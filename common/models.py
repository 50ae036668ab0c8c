"""CNN architectures as data: lists of layer specs with shapes, parameters and FLOPs.

Shapes are per sample, channel-first: (C, H, W) for feature maps, (F,) after
Flatten/GlobalAvgPool. Padding is explicit and symmetric (``kernel // 2``) so
both frameworks compute the same thing at any stride. FLOPs count a
multiply-add as two and are forward-pass, per sample; pipeline balancing uses
them as the cost of each layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod
from typing import Sequence, Union

from common.errors import UsageError


@dataclass(frozen=True)
class Conv:
    filters: int
    kernel: int = 3
    stride: int = 1
    relu: bool = True

    def out_shape(self, shape):
        channels, height, width = shape
        pad = self.kernel // 2
        return (self.filters, (height + 2 * pad - self.kernel) // self.stride + 1,
                (width + 2 * pad - self.kernel) // self.stride + 1)

    def params(self, shape):
        return self.kernel * self.kernel * shape[0] * self.filters + self.filters

    def flops(self, shape):
        out = self.out_shape(shape)
        return 2 * self.kernel * self.kernel * shape[0] * prod(out) + (prod(out) if self.relu else 0)


@dataclass(frozen=True)
class ConvBN:
    """Convolution without bias, BatchNorm, optional ReLU (the ResNet stem)."""
    filters: int
    kernel: int = 3
    stride: int = 1
    relu: bool = True

    def out_shape(self, shape):
        return Conv(self.filters, self.kernel, self.stride).out_shape(shape)

    def params(self, shape):
        return self.kernel * self.kernel * shape[0] * self.filters + 2 * self.filters

    def flops(self, shape):
        out = prod(self.out_shape(shape))
        return 2 * self.kernel * self.kernel * shape[0] * out + 4 * out + (out if self.relu else 0)


@dataclass(frozen=True)
class ResidualBlock:
    """ConvBN-ReLU, ConvBN, plus the input (1x1 ConvBN when the shape changes), ReLU."""
    filters: int
    stride: int = 1

    def has_projection(self, shape):
        return self.stride != 1 or shape[0] != self.filters

    def parts(self, shape):
        first = ConvBN(self.filters, 3, self.stride)
        second = ConvBN(self.filters, 3, 1, relu=False)
        mid = first.out_shape(shape)
        parts = [(first, shape), (second, mid)]
        if self.has_projection(shape):
            parts.append((ConvBN(self.filters, 1, self.stride, relu=False), shape))
        return parts

    def out_shape(self, shape):
        return ConvBN(self.filters, 3, self.stride).out_shape(shape)

    def params(self, shape):
        return sum(part.params(in_shape) for part, in_shape in self.parts(shape))

    def flops(self, shape):
        out = prod(self.out_shape(shape))
        return sum(part.flops(in_shape) for part, in_shape in self.parts(shape)) + 2 * out


@dataclass(frozen=True)
class MaxPool:
    size: int = 2

    def out_shape(self, shape):
        return (shape[0], shape[1] // self.size, shape[2] // self.size)

    def params(self, shape):
        return 0

    def flops(self, shape):
        return self.size * self.size * prod(self.out_shape(shape))


@dataclass(frozen=True)
class GlobalAvgPool:
    def out_shape(self, shape):
        return (shape[0],)

    def params(self, shape):
        return 0

    def flops(self, shape):
        return prod(shape)


@dataclass(frozen=True)
class Flatten:
    """Flattens in channel-first (C, H, W) order; the TF side permutes to match."""

    def out_shape(self, shape):
        return (prod(shape),)

    def params(self, shape):
        return 0

    def flops(self, shape):
        return 0


@dataclass(frozen=True)
class Dense:
    units: int
    relu: bool = False

    def out_shape(self, shape):
        return (self.units,)

    def params(self, shape):
        return shape[0] * self.units + self.units

    def flops(self, shape):
        return 2 * shape[0] * self.units + (self.units if self.relu else 0)


# Any one layer spec (each has out_shape, params and flops of an input shape).
Spec = Union[Conv, ConvBN, ResidualBlock, MaxPool, GlobalAvgPool, Flatten, Dense]


def seed_cnn(num_classes: int) -> list[Spec]:
    """The seed's CIFAR CNN: conv32-3x3, pool, conv64-3x3, pool, dense64, dense (ReLU)."""
    return [Conv(32), MaxPool(2), Conv(64), MaxPool(2), Flatten(), Dense(64, relu=True),
            Dense(num_classes)]


def small_resnet(num_classes: int) -> list[Spec]:
    """A ResNet-8-style network: stem, three residual stages (16, 32, 64), pooled head."""
    return [ConvBN(16), ResidualBlock(16), ResidualBlock(32, stride=2),
            ResidualBlock(64, stride=2), GlobalAvgPool(), Dense(num_classes)]


ARCHITECTURES = {"cnn": seed_cnn, "resnet": small_resnet}


def model_specs(name: str, input_shape: tuple, num_classes: int) -> list[Spec]:
    """The layer specs of model ``name`` for images of ``input_shape`` (C, H, W)."""
    if name not in ARCHITECTURES:
        raise UsageError(f"unknown model {name!r}; choose one of {', '.join(ARCHITECTURES)}")
    specs = ARCHITECTURES[name](num_classes)
    shapes = layer_shapes(specs, input_shape)
    if any(min(shape) < 1 for shape in shapes):
        raise UsageError(f"images of shape {tuple(input_shape)} are too small for model {name!r} "
                         "(a layer's output would be empty); use larger images")
    return specs


def layer_shapes(specs: Sequence[Spec], input_shape: tuple) -> list[tuple]:
    """Input shape followed by each layer's output shape."""
    shapes = [tuple(input_shape)]
    for spec in specs:
        shapes.append(spec.out_shape(shapes[-1]))
    return shapes


def layer_costs(specs: Sequence[Spec], input_shape: tuple) -> list[tuple]:
    """Per layer: (name, output shape, parameters, forward FLOPs per sample)."""
    shapes = layer_shapes(specs, input_shape)
    return [(type(spec).__name__, shapes[i + 1], spec.params(shapes[i]), spec.flops(shapes[i]))
            for i, spec in enumerate(specs)]


def total_params(specs: Sequence[Spec], input_shape: tuple) -> int:
    return sum(params for _, _, params, _ in layer_costs(specs, input_shape))
