"""CNN architectures as data: lists of layer specs with shapes, parameters and FLOPs.

Shapes are per sample, channel-first: (C, H, W) for feature maps, (F,) after
Flatten/GlobalAvgPool. Padding is explicit and symmetric (``kernel // 2``) so
both frameworks compute the same thing at any stride. FLOPs count a
multiply-add as two and are forward-pass, per sample; pipeline balancing uses
them as the cost of each layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from math import prod
from typing import NamedTuple

from common.core.errors import UsageError


@dataclass(frozen=True)
class Conv:
    """Convolution with bias, optional ReLU (the seed CNN and VGG)."""
    filters: int
    kernel: int = 3
    stride: int = 1
    relu: bool = True

    def out_shape(self, shape):
        return _conv_out(shape, self.filters, self.kernel, self.stride)

    def params(self, shape):
        return self.kernel * self.kernel * shape[0] * self.filters + self.filters

    def flops(self, shape):
        out = self.out_shape(shape)
        return 2 * self.kernel * self.kernel * shape[0] * prod(out) + (prod(out) if self.relu else 0)


def _conv_out(shape, filters, kernel, stride):
    _, height, width = shape
    pad = kernel // 2
    return (filters, (height + 2 * pad - kernel) // stride + 1, (width + 2 * pad - kernel) // stride + 1)


ACTIVATIONS = ("relu", "relu6", "")


@dataclass(frozen=True)
class ConvBN:
    """Convolution, BatchNorm, activation ('relu', 'relu6' or '' for none).

    No convolution bias unless ``bias`` (VGG-BN keeps it); ``depthwise`` convolves
    each channel on its own (groups = channels, so ``filters`` must equal them).
    """
    filters: int
    kernel: int = 3
    stride: int = 1
    activation: str = "relu"
    depthwise: bool = False
    bias: bool = False

    def out_shape(self, shape):
        return _conv_out(shape, self.filters, self.kernel, self.stride)

    def kernel_shape(self, shape):
        """(out, in per group, kh, kw), PyTorch's layout."""
        return (self.filters, 1 if self.depthwise else shape[0], self.kernel, self.kernel)

    def params(self, shape):
        return prod(self.kernel_shape(shape)) + (self.filters if self.bias else 0) + 2 * self.filters

    def flops(self, shape):
        out = prod(self.out_shape(shape))
        fan_in = prod(self.kernel_shape(shape)[1:])
        return 2 * fan_in * out + 4 * out + (out if self.activation else 0)


class _Block:
    """A residual-style block: a path of ConvBN parts, a shortcut, optional final ReLU.

    Subclasses give ``path(shape)`` (named parts in order) and ``projection(shape)``
    (the shortcut's 1x1 ConvBN, or None); ``identity(shape)`` says whether the input
    itself is added when there is no projection.
    """
    final_relu = True

    def path(self, shape) -> list[tuple[str, ConvBN]]:
        raise NotImplementedError

    def projection(self, shape):
        return None

    def identity(self, shape) -> bool:
        return True

    def parts(self, shape) -> list[tuple[str, ConvBN, tuple]]:
        """Every parameterised part with its input shape: the path, then the projection."""
        found, current = [], tuple(shape)
        for name, part in self.path(shape):
            found.append((name, part, current))
            current = part.out_shape(current)
        projection = self.projection(shape)
        if projection is not None:
            found.append(("projection", projection, tuple(shape)))
        return found

    def adds_shortcut(self, shape) -> bool:
        return self.projection(shape) is not None or self.identity(shape)

    def out_shape(self, shape):
        current = tuple(shape)
        for _, part in self.path(shape):
            current = part.out_shape(current)
        return current

    def params(self, shape):
        return sum(part.params(in_shape) for _, part, in_shape in self.parts(shape))

    def flops(self, shape):
        out = prod(self.out_shape(shape))
        extra = (out if self.adds_shortcut(shape) else 0) + (out if self.final_relu else 0)
        return sum(part.flops(in_shape) for _, part, in_shape in self.parts(shape)) + extra


@dataclass(frozen=True)
class ResidualBlock(_Block):
    """ResNet's basic block: 3x3 ConvBN-ReLU, 3x3 ConvBN, plus the input (1x1 ConvBN
    projection when the shape changes), ReLU."""
    filters: int
    stride: int = 1

    def path(self, shape):
        return [("first", ConvBN(self.filters, 3, self.stride)),
                ("second", ConvBN(self.filters, 3, 1, activation=""))]

    def projection(self, shape):
        if self.stride != 1 or shape[0] != self.filters:
            return ConvBN(self.filters, 1, self.stride, activation="")
        return None


@dataclass(frozen=True)
class Bottleneck(_Block):
    """ResNet-50's block (v1.5, stride on the 3x3): 1x1 -> 3x3 -> 1x1 (x4 channels)."""
    width: int
    stride: int = 1
    expansion: int = 4

    def path(self, shape):
        return [("first", ConvBN(self.width, 1)), ("second", ConvBN(self.width, 3, self.stride)),
                ("third", ConvBN(self.width * self.expansion, 1, activation=""))]

    def projection(self, shape):
        out = self.width * self.expansion
        if self.stride != 1 or shape[0] != out:
            return ConvBN(out, 1, self.stride, activation="")
        return None


@dataclass(frozen=True)
class InvertedResidual(_Block):
    """MobileNetV2's block: 1x1 expand (ReLU6), 3x3 depthwise (ReLU6), 1x1 linear
    project; the input is added only when the shape is unchanged; no final ReLU."""
    filters: int
    stride: int = 1
    expand_ratio: int = 6
    final_relu = False

    def path(self, shape):
        hidden = shape[0] * self.expand_ratio
        expand = [("expand", ConvBN(hidden, 1, activation="relu6"))] if self.expand_ratio != 1 else []
        return expand + [("depthwise", ConvBN(hidden, 3, self.stride, activation="relu6", depthwise=True)),
                         ("project", ConvBN(self.filters, 1, activation=""))]

    def identity(self, shape):
        return self.stride == 1 and shape[0] == self.filters


BLOCKS = (ResidualBlock, Bottleneck, InvertedResidual)


@dataclass(frozen=True)
class MaxPool:
    """Max pooling; ``stride`` 0 means the window size; padding never wins the max."""
    size: int = 2
    stride: int = 0
    padding: int = 0

    def out_shape(self, shape):
        stride = self.stride or self.size
        return (shape[0], (shape[1] + 2 * self.padding - self.size) // stride + 1,
                (shape[2] + 2 * self.padding - self.size) // stride + 1)

    def params(self, shape):
        return 0

    def flops(self, shape):
        return self.size * self.size * prod(self.out_shape(shape))


@dataclass(frozen=True)
class AdaptiveAvgPool:
    """Average over ``size`` x ``size`` bins as PyTorch's AdaptiveAvgPool2d draws them
    (VGG's 7x7 before its classifier; any input size)."""
    size: int = 7

    def out_shape(self, shape):
        return (shape[0], self.size, self.size)

    def params(self, shape):
        return 0

    def flops(self, shape):
        return prod(shape)


def adaptive_pool_matrix(in_size: int, out_size: int) -> list[list[float]]:
    """(out_size x in_size) averaging weights of AdaptiveAvgPool2d's bins along one axis:
    bin i covers floor(i * in / out) .. ceil((i + 1) * in / out) - 1."""
    rows = []
    for i in range(out_size):
        start, end = (i * in_size) // out_size, -(-((i + 1) * in_size) // out_size)
        rows.append([1.0 / (end - start) if start <= j < end else 0.0 for j in range(in_size)])
    return rows


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
    """A fully connected layer, optional ReLU. ``dropout`` > 0 drops that share of its
    INPUT while training, with common/model/dropout.py's seeded masks."""
    units: int
    relu: bool = False
    dropout: float = 0.0

    def out_shape(self, shape):
        return (self.units,)

    def params(self, shape):
        return shape[0] * self.units + self.units

    def flops(self, shape):
        return 2 * shape[0] * self.units + (self.units if self.relu else 0)


# Any one layer spec (each has out_shape, params and flops of an input shape).
Spec = (Conv | ConvBN | ResidualBlock | Bottleneck | InvertedResidual | MaxPool | AdaptiveAvgPool | GlobalAvgPool
        | Flatten | Dense)

# Inputs up to this size get the CIFAR-style stem (3x3 conv at stride 1, no max-pool)
# under --stem auto: the ImageNet stem would shrink a 32 px image to 8 px at once.
SMALL_INPUT = 64
STEMS = ("auto", "imagenet", "cifar")


def seed_cnn(num_classes: int, small: bool, dropout: float) -> list[Spec]:
    """The seed's CIFAR CNN: conv32-3x3, pool, conv64-3x3, pool, dense64, dense (ReLU)."""
    return [Conv(32), MaxPool(2), Conv(64), MaxPool(2), Flatten(), Dense(64, relu=True),
            Dense(num_classes, dropout=dropout)]


def resnet8(num_classes: int, small: bool, dropout: float) -> list[Spec]:
    """A ResNet-8-style network: stem, three residual stages (16, 32, 64), pooled head."""
    return [ConvBN(16), ResidualBlock(16), ResidualBlock(32, stride=2),
            ResidualBlock(64, stride=2), GlobalAvgPool(), Dense(num_classes, dropout=dropout)]


def _resnet_stem(small: bool) -> list[Spec]:
    if small:
        return [ConvBN(64, 3, 1)]
    return [ConvBN(64, 7, 2), MaxPool(3, 2, padding=1)]


def _resnet(blocks_per_stage, block, num_classes, small, dropout):
    """torchvision's ResNet: stem, four stages (64, 128, 256, 512 wide; stride 2 from
    the second on), global average pool, one dense layer."""
    specs = _resnet_stem(small)
    for stage, count in enumerate(blocks_per_stage):
        width = 64 * 2 ** stage
        for index in range(count):
            specs.append(block(width, 2 if stage and not index else 1))
    return specs + [GlobalAvgPool(), Dense(num_classes, dropout=dropout)]


def resnet18(num_classes: int, small: bool, dropout: float) -> list[Spec]:
    return _resnet((2, 2, 2, 2), ResidualBlock, num_classes, small, dropout)


def resnet34(num_classes: int, small: bool, dropout: float) -> list[Spec]:
    return _resnet((3, 4, 6, 3), ResidualBlock, num_classes, small, dropout)


def resnet50(num_classes: int, small: bool, dropout: float) -> list[Spec]:
    return _resnet((3, 4, 6, 3), Bottleneck, num_classes, small, dropout)


VGG_LAYERS = {"vgg11": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
              "vgg16": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
                        512, 512, 512, "M")}


def _vgg(name, batch_norm, num_classes, small, dropout):
    """torchvision's VGG, its Dropout after each hidden dense layer's ReLU (here: on the
    next layer's input). The ImageNet head pools to 7x7 first; on small inputs the
    512-channel map is flattened as it is (1x1 at 32 px)."""
    specs = [MaxPool(2) if item == "M" else (ConvBN(item, bias=True) if batch_norm else Conv(item))
             for item in VGG_LAYERS[name]]
    head = [Flatten()] if small else [AdaptiveAvgPool(7), Flatten()]
    return specs + head + [Dense(4096, relu=True), Dense(4096, relu=True, dropout=dropout),
                           Dense(num_classes, dropout=dropout)]


# (expand ratio, channels, blocks, first stride) of torchvision's MobileNetV2 (width 1.0).
MOBILENET_V2_STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                       (6, 160, 3, 2), (6, 320, 1, 1))


def mobilenet_v2(num_classes: int, small: bool, dropout: float) -> list[Spec]:
    """torchvision's MobileNetV2 (Dropout before its classifier); the small-input stem keeps stride 1."""
    specs: list[Spec] = [ConvBN(32, 3, 1 if small else 2, activation="relu6")]
    for expand, channels, count, stride in MOBILENET_V2_STAGES:
        specs += [InvertedResidual(channels, stride if index == 0 else 1, expand) for index in range(count)]
    return specs + [ConvBN(1280, 1, activation="relu6"), GlobalAvgPool(), Dense(num_classes, dropout=dropout)]


ARCHITECTURES = {
    "cnn": seed_cnn, "resnet8": resnet8, "resnet18": resnet18, "resnet34": resnet34,
    "resnet50": resnet50,
    "vgg11": lambda classes, small, dropout: _vgg("vgg11", False, classes, small, dropout),
    "vgg11_bn": lambda classes, small, dropout: _vgg("vgg11", True, classes, small, dropout),
    "vgg16": lambda classes, small, dropout: _vgg("vgg16", False, classes, small, dropout),
    "vgg16_bn": lambda classes, small, dropout: _vgg("vgg16", True, classes, small, dropout),
    "mobilenet_v2": mobilenet_v2,
}
# --dropout's default: torchvision's rates; the networks whose definitions have none get 0
# (--dropout P then drops before their classifier).
DEFAULT_DROPOUT = {"vgg11": 0.5, "vgg11_bn": 0.5, "vgg16": 0.5, "vgg16_bn": 0.5, "mobilenet_v2": 0.2}
# Older names still accepted on the command line (checkpoints record the canonical one).
ALIASES = {"resnet": "resnet8"}


def canonical_name(name: str) -> str:
    return ALIASES.get(name, name)


def dropout_rate(name: str, dropout: float | None) -> float:
    """--dropout as given, or (None) the model's own default."""
    return DEFAULT_DROPOUT.get(canonical_name(name), 0.0) if dropout is None else float(dropout)


def drops(specs: Sequence[Spec]) -> bool:
    """Whether training the model draws dropout masks (its layers then need sample keys)."""
    return any(isinstance(spec, Dense) and spec.dropout > 0 for spec in specs)


STEMLESS = ("cnn", "resnet8")  # fixed small-image networks: --stem does not apply


def resolved_stem(name: str, stem: str, input_shape: tuple):
    """'cifar' or 'imagenet' for the zoo's networks, None for those without a stem choice."""
    if canonical_name(name) in STEMLESS:
        return None
    return "cifar" if small_stem(stem, input_shape) else "imagenet"


def small_stem(stem: str, input_shape: tuple) -> bool:
    """Whether --stem (auto, imagenet, cifar) picks the CIFAR-style stem for these images."""
    if stem == "auto":
        return max(input_shape[1:]) <= SMALL_INPUT
    return stem == "cifar"


def model_specs(name: str, input_shape: tuple, num_classes: int, stem: str = "auto",
                size_fix: str = "use larger images", dropout: float | None = None) -> list[Spec]:
    """The layer specs of model ``name`` for images of ``input_shape`` (C, H, W); ``dropout``
    None gives the model's default rate."""
    name = canonical_name(name)
    if name not in ARCHITECTURES:
        raise UsageError(f"unknown model {name!r}; choose one of {', '.join(ARCHITECTURES)}")
    specs = ARCHITECTURES[name](num_classes, small_stem(stem, input_shape), dropout_rate(name, dropout))
    shapes = layer_shapes(specs, input_shape)
    if any(min(shape) < 1 for shape in shapes):
        raise UsageError(f"images of shape {tuple(input_shape)} are too small for model {name!r} "
                         f"(a layer's output would be empty); {size_fix}")
    return specs


def layer_shapes(specs: Sequence[Spec], input_shape: tuple) -> list[tuple]:
    """Input shape followed by each layer's output shape."""
    shapes = [tuple(input_shape)]
    for spec in specs:
        shapes.append(spec.out_shape(shapes[-1]))
    return shapes


class LayerCost(NamedTuple):
    name: str                        # the spec's class, e.g. "ConvBN"
    out_shape: tuple
    params: int
    flops: int                       # forward, per sample


def layer_costs(specs: Sequence[Spec], input_shape: tuple) -> list[LayerCost]:
    shapes = layer_shapes(specs, input_shape)
    return [LayerCost(type(spec).__name__, shapes[i + 1], spec.params(shapes[i]), spec.flops(shapes[i]))
            for i, spec in enumerate(specs)]


def total_params(specs: Sequence[Spec], input_shape: tuple) -> int:
    return sum(cost.params for cost in layer_costs(specs, input_shape))
