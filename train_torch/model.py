"""PyTorch modules built from common/model/networks.py layer specs.

The model is a flat nn.Sequential with one module per spec, so a pipeline
stage is simply a slice of it. Nothing here knows about distribution.
"""

import contextlib

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from common.model import dropout, networks, weights

ACTIVATIONS = {"relu": torch.relu, "relu6": nn.functional.relu6, "": None}


def _activate(x, name):
    return ACTIVATIONS[name](x) if name else x


class ConvLayer(nn.Module):
    def __init__(self, spec, in_channels):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, spec.filters, spec.kernel, spec.stride,
                              padding=spec.kernel // 2)
        self.relu = spec.relu

    def forward(self, x):
        x = self.conv(x)
        return torch.relu(x) if self.relu else x


class BatchNorm(nn.BatchNorm2d):
    """PyTorch's BatchNorm2d. With ``reduce_sums`` set (a differentiable sum over the
    data-parallel replicas, see set_batch_norm_reduction), training normalises with the
    mean and variance of the GLOBAL batch: each replica sums its share, one allreduce
    adds them up, and autograd's backward allreduces the gradients of those sums.
    The sums are taken around the running mean (the same on every replica), which
    keeps E[x^2] - E[x]^2 from cancelling when the batch mean is large."""

    reduce_sums = None

    def forward(self, x):
        if self.reduce_sums is None or not self.training:
            return super().forward(x)
        channels = x.shape[1]
        shift = self.running_mean.clone().view(1, -1, 1, 1)
        centred = x.float() - shift
        count = torch.full((1,), x.numel() / channels, dtype=torch.float32, device=x.device)
        total = self.reduce_sums(torch.cat([centred.sum((0, 2, 3)), centred.square().sum((0, 2, 3)), count]))
        samples = total[-1]
        shifted_mean = total[:channels] / samples
        variance = total[channels:2 * channels] / samples - shifted_mean.square()
        with torch.no_grad():
            self.running_mean.mul_(1 - self.momentum).add_(self.momentum * (shifted_mean + shift.view(-1)))
            unbiased = variance * samples / torch.clamp(samples - 1, min=1)
            self.running_var.mul_(1 - self.momentum).add_(self.momentum * unbiased)
            self.num_batches_tracked.add_(1)
        scale = (torch.rsqrt(variance + self.eps) * self.weight).view(1, -1, 1, 1)
        normalised = (centred - shifted_mean.view(1, -1, 1, 1)) * scale + self.bias.view(1, -1, 1, 1)
        return normalised.to(x.dtype)


class ConvBNLayer(nn.Module):
    def __init__(self, spec, in_channels):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, spec.filters, spec.kernel, spec.stride, padding=spec.kernel // 2,
                              groups=in_channels if spec.depthwise else 1, bias=spec.bias)
        self.bn = BatchNorm(spec.filters)
        self.activation = spec.activation

    def forward(self, x):
        return _activate(self.bn(self.conv(x)), self.activation)


class BlockLayer(nn.Module):
    """Any common/model/networks.py block: its path of ConvBN parts in order, plus the
    shortcut (projection, identity or none), then ReLU if the block has one."""

    def __init__(self, spec, in_shape):
        super().__init__()
        self.path_names = [name for name, _ in spec.path(in_shape)]
        for name, part, part_in in spec.parts(in_shape):
            self.add_module(name, ConvBNLayer(part, part_in[0]))
        if spec.projection(in_shape) is None:
            self.projection = None
        self.identity = spec.identity(in_shape)
        self.final_relu = spec.final_relu

    def forward(self, x):
        out = x
        for name in self.path_names:
            out = getattr(self, name)(out)
        if self.projection is not None:
            out = out + self.projection(x)
        elif self.identity:
            out = out + x
        return torch.relu(out) if self.final_relu else out


class DenseLayer(nn.Module):
    """Linear, optional ReLU; while training with ``dropout_keys`` (a batch's sample keys,
    common/model/dropout.py) and a rate, the input first loses the units its masks drop."""

    def __init__(self, spec, in_features, layer_index):
        super().__init__()
        self.linear = nn.Linear(in_features, spec.units)
        self.relu = spec.relu
        self.rate, self.layer_index = spec.dropout, layer_index

    def forward(self, x, dropout_keys=None):
        if self.training and self.rate and dropout_keys is not None:
            x = x * seeded_dropout_mask(dropout_keys, x.shape[1], self.layer_index, self.rate, x.dtype)
        x = self.linear(x)
        return torch.relu(x) if self.relu else x


def seeded_dropout_mask(keys, features, layer_index, rate, dtype):
    """(samples, features): 0 for a dropped unit, 1 / (1 - rate) for a kept one."""
    ids = torch.arange(features, dtype=torch.int64, device=keys.device)
    kept = dropout.keep(keys, ids, layer_index, rate)
    # Python numbers, not tensors made from them (each would be a blocking copy to a GPU).
    return torch.where(kept, dropout.scale(rate), 0.0).to(dtype)


def dropout_keys(seed, batch, device):
    """The sample keys of a training batch's seeded dropout masks, on ``device``."""
    return torch.from_numpy(dropout.sample_keys(seed, batch.epoch, batch.indices)).to(device)


class Layers(nn.Sequential):
    """The model or a stage: the specs' layers in order. ``dropout_keys`` (int64, one per
    sample) reach the layers that drop; without them (evaluation, timing) nothing drops."""

    recompute = False  # --recompute: keep only each layer's input for the backward (set by the runner)

    def forward(self, x, dropout_keys=None):
        for layer in self:
            def run(inputs, layer=layer):
                return layer(inputs, dropout_keys) if isinstance(layer, DenseLayer) else layer(inputs)
            if self.recompute and self.training and torch.is_grad_enabled():
                # The forward again at the backward, BatchNorm's running statistics left as the first one moved them.
                x = checkpoint(run, x, use_reentrant=False,
                               context_fn=lambda layer=layer: (contextlib.nullcontext(), frozen_batch_norm(layer)))
            else:
                x = run(x)
        return x


@contextlib.contextmanager
def frozen_batch_norm(module):
    """Inside: training-mode BatchNorm in ``module`` normalises by the batch and leaves its
    running statistics (and its batch count) as they are."""
    norms = [layer for layer in module.modules() if isinstance(layer, BatchNorm)]
    saved = [(norm.momentum, norm.num_batches_tracked.clone()) for norm in norms]
    for norm in norms:
        norm.momentum = 0.0
    try:
        yield
    finally:
        for norm, (momentum, count) in zip(norms, saved):
            norm.momentum = momentum
            norm.num_batches_tracked.copy_(count)


class GlobalAvgPoolLayer(nn.Module):
    def forward(self, x):
        return x.mean(dim=(2, 3))


def build_layer(spec, in_shape, index):
    """The module of ``spec``, the model's ``index``-th layer (dropout masks are keyed by it)."""
    if isinstance(spec, networks.Conv):
        return ConvLayer(spec, in_shape[0])
    if isinstance(spec, networks.ConvBN):
        return ConvBNLayer(spec, in_shape[0])
    if isinstance(spec, networks.BLOCKS):
        return BlockLayer(spec, in_shape)
    if isinstance(spec, networks.MaxPool):
        return nn.MaxPool2d(spec.size, spec.stride or spec.size, spec.padding)
    if isinstance(spec, networks.AdaptiveAvgPool):
        return nn.AdaptiveAvgPool2d(spec.size)
    if isinstance(spec, networks.GlobalAvgPool):
        return GlobalAvgPoolLayer()
    if isinstance(spec, networks.Flatten):
        return nn.Flatten()
    if isinstance(spec, networks.Dense):
        return DenseLayer(spec, in_shape[0], index)
    raise TypeError(f"no torch layer for spec {spec!r}")


def build_stage(specs, input_shape, seed, start, end):
    """Layers start..end-1 of the model, holding exactly the whole model's initial weights."""
    shapes = networks.layer_shapes(specs, input_shape)
    stage = Layers(*(build_layer(specs[i], shapes[i], i) for i in range(start, end)))
    load_neutral(stage, weights.stage_arrays(weights.initial_weights(specs, input_shape, seed), start, end))
    return stage


def set_batch_norm_reduction(model, reduce_sums):
    """Give every BatchNorm layer ``reduce_sums`` (a differentiable sum of a 1-D tensor
    over the replicas that share a batch), or None for per-replica statistics."""
    for module in model.modules():
        if isinstance(module, BatchNorm):
            module.reduce_sums = reduce_sums


def batch_norm_statistics(model) -> list:
    """The running means and variances of every BatchNorm layer."""
    return [buffer for module in model.modules() if isinstance(module, BatchNorm)
            for buffer in (module.running_mean, module.running_var)]


def build_model(specs, input_shape, seed):
    """Layers (an nn.Sequential) of the specs, with common/model/weights.py's initial weights for ``seed``
    (the same weights on every rank and in both frameworks)."""
    return build_stage(specs, input_shape, seed, 0, len(specs))


# --- The neutral weight layout (common/model/weights.py) ------------------------------

def named_tensors(model):
    """{neutral key: tensor}; the layout is PyTorch's, so only the names change."""
    found = {}
    for prefix, module in model.named_modules():
        if isinstance(module, ConvBNLayer):
            if module.conv.bias is not None:
                found[f"{prefix}.conv.bias"] = module.conv.bias
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
