"""Layer specs against the PyTorch modules built from them (no MPI)."""

import pytest
import torch

from common import models
from common.errors import UsageError
from train_torch.model import build_model

SHAPES = [(1, 8, 8), (3, 32, 32), (3, 17, 13)]


@pytest.mark.parametrize("name", sorted(models.ARCHITECTURES))
@pytest.mark.parametrize("shape", SHAPES)
def test_spec_parameter_counts_and_shapes_match_torch(name, shape):
    specs = models.model_specs(name, shape, 10)
    model = build_model(specs, shape, seed=0)
    shapes = models.layer_shapes(specs, shape)
    x = torch.zeros(2, *shape)
    for layer, spec, in_shape, out_shape in zip(model, specs, shapes, shapes[1:]):
        assert sum(p.numel() for p in layer.parameters()) == spec.params(in_shape), spec
        x = layer(x)
        assert tuple(x.shape[1:]) == out_shape, spec
    assert sum(p.numel() for p in model.parameters()) == models.total_params(specs, shape)


def test_seed_cnn_is_the_seed_architecture():
    specs = models.model_specs("cnn", (3, 32, 32), 10)
    assert [type(spec).__name__ for spec in specs] == ["Conv", "MaxPool", "Conv", "MaxPool", "Flatten",
                                                       "Dense", "Dense"]
    assert (specs[0].filters, specs[2].filters, specs[5].units, specs[6].units) == (32, 64, 64, 10)


def test_flop_counts():
    conv = models.Conv(32, kernel=3, relu=False)
    assert conv.flops((3, 32, 32)) == 2 * 9 * 3 * 32 * 32 * 32
    assert models.Dense(10).flops((64,)) == 2 * 64 * 10
    costs = models.layer_costs(models.model_specs("resnet", (3, 32, 32), 10), (3, 32, 32))
    assert all(flops > 0 for _, _, _, flops in costs)


def counted_flops(module, shape):
    """FLOPs PyTorch's own counter sees in one sample's forward (convolutions and matmuls)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        module(torch.zeros(1, *shape))
    return counter.get_total_flops()


@pytest.mark.parametrize("spec,shape", [(models.Conv(16, 3, 1, relu=False), (3, 17, 13)),
                                        (models.Conv(8, 3, 2, relu=False), (4, 9, 9)),
                                        (models.Conv(8, 1, 1, relu=False), (5, 6, 6))])
def test_convolution_flops_equal_torchs_count(spec, shape):
    model = build_model([spec, models.GlobalAvgPool()], shape, seed=0)
    assert spec.flops(shape) == counted_flops(model[0], shape)


@pytest.mark.parametrize("name", sorted(models.ARCHITECTURES))
@pytest.mark.parametrize("shape", SHAPES)
def test_layer_flops_agree_with_torchs_count(name, shape):
    """Per layer, ours = torch's count of the convolutions and matmuls plus the
    element-wise work it leaves out (ReLU, BatchNorm, pooling, residual adds:
    at most a few operations per element and part), never less than torch's count."""
    specs = models.model_specs(name, shape, 10)
    model = build_model(specs, shape, seed=0)
    shapes = models.layer_shapes(specs, shape)
    for layer, spec, in_shape, out_shape in zip(model, specs, shapes, shapes[1:]):
        counted, ours = counted_flops(layer, in_shape), spec.flops(in_shape)
        elements = max(models.prod(in_shape), models.prod(out_shape))
        assert counted <= ours <= counted + 16 * elements, spec
    total = sum(spec.flops(in_shape) for spec, in_shape in zip(specs, shapes))
    assert counted_flops(model, shape) <= total <= 1.05 * counted_flops(model, shape)


def test_unknown_model_and_too_small_images():
    with pytest.raises(UsageError, match="unknown model 'vgg'"):
        models.model_specs("vgg", (1, 8, 8), 10)
    with pytest.raises(UsageError, match="too small"):
        models.model_specs("cnn", (1, 3, 3), 10)
