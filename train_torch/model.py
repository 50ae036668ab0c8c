"""PyTorch modules built from common/models.py layer specs.

The model is a flat nn.Sequential with one module per spec, so a pipeline
stage is simply a slice of it. Nothing here knows about distribution.
"""

import torch
from torch import nn

from common import models, weights


class ConvLayer(nn.Module):
    def __init__(self, spec, in_channels):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, spec.filters, spec.kernel, spec.stride,
                              padding=spec.kernel // 2)
        self.relu = spec.relu

    def forward(self, x):
        x = self.conv(x)
        return torch.relu(x) if self.relu else x


class ConvBNLayer(nn.Module):
    def __init__(self, spec, in_channels):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, spec.filters, spec.kernel, spec.stride,
                              padding=spec.kernel // 2, bias=False)
        self.bn = nn.BatchNorm2d(spec.filters)
        self.relu = spec.relu

    def forward(self, x):
        x = self.bn(self.conv(x))
        return torch.relu(x) if self.relu else x


class ResidualLayer(nn.Module):
    def __init__(self, spec, in_shape):
        super().__init__()
        parts = spec.parts(in_shape)
        self.first = ConvBNLayer(parts[0][0], in_shape[0])
        self.second = ConvBNLayer(parts[1][0], spec.filters)
        self.projection = ConvBNLayer(parts[2][0], in_shape[0]) if len(parts) == 3 else None

    def forward(self, x):
        shortcut = x if self.projection is None else self.projection(x)
        return torch.relu(self.second(self.first(x)) + shortcut)


class DenseLayer(nn.Module):
    def __init__(self, spec, in_features):
        super().__init__()
        self.linear = nn.Linear(in_features, spec.units)
        self.relu = spec.relu

    def forward(self, x):
        x = self.linear(x)
        return torch.relu(x) if self.relu else x


class GlobalAvgPoolLayer(nn.Module):
    def forward(self, x):
        return x.mean(dim=(2, 3))


def build_layer(spec, in_shape):
    if isinstance(spec, models.Conv):
        return ConvLayer(spec, in_shape[0])
    if isinstance(spec, models.ConvBN):
        return ConvBNLayer(spec, in_shape[0])
    if isinstance(spec, models.ResidualBlock):
        return ResidualLayer(spec, in_shape)
    if isinstance(spec, models.MaxPool):
        return nn.MaxPool2d(spec.size)
    if isinstance(spec, models.GlobalAvgPool):
        return GlobalAvgPoolLayer()
    if isinstance(spec, models.Flatten):
        return nn.Flatten()
    if isinstance(spec, models.Dense):
        return DenseLayer(spec, in_shape[0])
    raise TypeError(f"no torch layer for spec {spec!r}")


def build_stage(specs, input_shape, seed, start, end):
    """Layers start..end-1 of the model, holding exactly the whole model's initial weights."""
    shapes = models.layer_shapes(specs, input_shape)
    stage = nn.Sequential(*(build_layer(specs[i], shapes[i]) for i in range(start, end)))
    load_neutral(stage, weights.stage_arrays(weights.initial_weights(specs, input_shape, seed), start, end))
    return stage


def build_model(specs, input_shape, seed):
    """nn.Sequential of the specs, with common/weights.py's initial weights for ``seed``
    (the same weights on every rank and in both frameworks)."""
    return build_stage(specs, input_shape, seed, 0, len(specs))


# --- The neutral weight layout (common/weights.py) ------------------------------

def named_tensors(model):
    """{neutral key: tensor}; the layout is PyTorch's, so only the names change."""
    found = {}
    for prefix, module in model.named_modules():
        if isinstance(module, ConvBNLayer):
            found.update({f"{prefix}.conv.kernel": module.conv.weight, f"{prefix}.bn.gamma": module.bn.weight,
                          f"{prefix}.bn.beta": module.bn.bias, f"{prefix}.bn.mean": module.bn.running_mean,
                          f"{prefix}.bn.var": module.bn.running_var})
        elif isinstance(module, (ConvLayer, DenseLayer)):
            inner = module.conv if isinstance(module, ConvLayer) else module.linear
            found.update({f"{prefix}.kernel": inner.weight, f"{prefix}.bias": inner.bias})
    return found


def to_neutral(model):
    return {key: tensor.detach().cpu().numpy().copy() for key, tensor in named_tensors(model).items()}


@torch.no_grad()
def load_neutral(model, arrays):
    for key, tensor in named_tensors(model).items():
        tensor.copy_(torch.from_numpy(arrays[key]))
