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


def test_unknown_model_and_too_small_images():
    with pytest.raises(UsageError, match="unknown model 'vgg'"):
        models.model_specs("vgg", (1, 8, 8), 10)
    with pytest.raises(UsageError, match="too small"):
        models.model_specs("cnn", (1, 3, 3), 10)
