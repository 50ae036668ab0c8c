"""Layer specs against the PyTorch modules built from them (no MPI)."""

import pytest
import torch

from common.core.errors import UsageError
from common.model import networks
from train_torch.model import build_model

SHAPES = [(1, 8, 8), (3, 32, 32), (3, 17, 13)]
# (model, input shape, stem): every network at small and odd sizes, both stems.
CASES = ([(name, shape, "auto") for name in ("cnn", "resnet8") for shape in SHAPES]
         + [(name, (3, 32, 32), "auto") for name in networks.ARCHITECTURES if name not in ("cnn", "resnet8")]
         + [("resnet18", (3, 23, 17), "auto"), ("resnet50", (3, 70, 66), "imagenet"),
            ("mobilenet_v2", (1, 37, 45), "auto"), ("mobilenet_v2", (3, 70, 64), "imagenet"),
            ("vgg11_bn", (3, 45, 33), "imagenet"), ("vgg11", (3, 40, 32), "cifar")])
IDS = [f"{name}-{'x'.join(map(str, shape))}-{stem}" for name, shape, stem in CASES]

# torchvision's parameter counts at 224x224 with 1,000 classes (torchvision.models docs,
# "num_params"); Dropout, ours seeded, has no parameters.
TORCHVISION_PARAMS = {"resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032,
                      "vgg11": 132_863_336, "vgg11_bn": 132_868_840, "vgg16": 138_357_544,
                      "vgg16_bn": 138_365_992, "mobilenet_v2": 3_504_872}


@pytest.mark.heavy
@pytest.mark.parametrize("name", sorted(TORCHVISION_PARAMS))
def test_parameter_counts_at_224_equal_torchvisions(name):
    specs = networks.model_specs(name, (3, 224, 224), 1000)
    assert networks.total_params(specs, (3, 224, 224)) == TORCHVISION_PARAMS[name]
    if name.startswith("resnet") or name == "mobilenet_v2":  # the VGGs' 130 M would cost seconds to build
        model = build_model(specs, (3, 224, 224), seed=0)
        assert sum(p.numel() for p in model.parameters()) == TORCHVISION_PARAMS[name]


def test_stems():
    assert networks.model_specs("resnet18", (3, 64, 64), 10)[0] == networks.ConvBN(64, 3, 1)  # auto: cifar
    imagenet = networks.model_specs("resnet18", (3, 65, 65), 10)
    assert imagenet[:2] == [networks.ConvBN(64, 7, 2), networks.MaxPool(3, 2, padding=1)]
    assert networks.model_specs("resnet18", (3, 32, 32), 10, "imagenet")[0] == networks.ConvBN(64, 7, 2)
    assert networks.AdaptiveAvgPool(7) in networks.model_specs("vgg16", (3, 224, 224), 10)
    assert networks.AdaptiveAvgPool(7) not in networks.model_specs("vgg16", (3, 32, 32), 10)
    assert networks.model_specs("resnet", (1, 8, 8), 10) == networks.model_specs("resnet8", (1, 8, 8), 10)


@pytest.mark.parametrize("name,shape,stem", CASES, ids=IDS)
def test_spec_parameter_counts_and_shapes_match_torch(name, shape, stem):
    specs = networks.model_specs(name, shape, 10, stem)
    model = build_model(specs, shape, seed=0)
    shapes = networks.layer_shapes(specs, shape)
    x = torch.zeros(2, *shape)
    for layer, spec, in_shape, out_shape in zip(model, specs, shapes, shapes[1:]):
        assert sum(p.numel() for p in layer.parameters()) == spec.params(in_shape), spec
        x = layer(x)
        assert tuple(x.shape[1:]) == out_shape, spec
    assert sum(p.numel() for p in model.parameters()) == networks.total_params(specs, shape)


def test_seed_cnn_is_the_seed_architecture():
    specs = networks.model_specs("cnn", (3, 32, 32), 10)
    assert [type(spec).__name__ for spec in specs] == ["Conv", "MaxPool", "Conv", "MaxPool", "Flatten",
                                                       "Dense", "Dense"]
    assert (specs[0].filters, specs[2].filters, specs[5].units, specs[6].units) == (32, 64, 64, 10)


def test_flop_counts():
    conv = networks.Conv(32, kernel=3, relu=False)
    assert conv.flops((3, 32, 32)) == 2 * 9 * 3 * 32 * 32 * 32
    assert networks.Dense(10).flops((64,)) == 2 * 64 * 10
    costs = networks.layer_costs(networks.model_specs("resnet", (3, 32, 32), 10), (3, 32, 32))
    assert all(flops > 0 for _, _, _, flops in costs)


def counted_flops(module, shape):
    """FLOPs PyTorch's own counter sees in one sample's forward (convolutions and matmuls)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        module(torch.zeros(1, *shape))
    return counter.get_total_flops()


@pytest.mark.parametrize("spec,shape", [(networks.Conv(16, 3, 1, relu=False), (3, 17, 13)),
                                        (networks.Conv(8, 3, 2, relu=False), (4, 9, 9)),
                                        (networks.Conv(8, 1, 1, relu=False), (5, 6, 6))])
def test_convolution_flops_equal_torchs_count(spec, shape):
    model = build_model([spec, networks.GlobalAvgPool()], shape, seed=0)
    assert spec.flops(shape) == counted_flops(model[0], shape)


@pytest.mark.heavy
@pytest.mark.parametrize("name,shape,stem", CASES, ids=IDS)
def test_layer_flops_agree_with_torchs_count(name, shape, stem):
    """Per layer, ours = torch's count of the convolutions and matmuls plus the
    element-wise work it leaves out (ReLU, BatchNorm, pooling, residual adds:
    at most a few operations per element of each part's output), never less than torch's count."""
    specs = networks.model_specs(name, shape, 10, stem)
    model = build_model(specs, shape, seed=0)
    shapes = networks.layer_shapes(specs, shape)
    for layer, spec, in_shape, out_shape in zip(model, specs, shapes, shapes[1:]):
        counted, ours = counted_flops(layer, in_shape), spec.flops(in_shape)
        parts = spec.parts(in_shape) if isinstance(spec, networks.BLOCKS) else []
        elements = (networks.prod(in_shape) + networks.prod(out_shape)
                    + sum(networks.prod(part.out_shape(part_in)) for _, part, part_in in parts))
        assert counted <= ours <= counted + 16 * elements, spec
    total = sum(spec.flops(in_shape) for spec, in_shape in zip(specs, shapes))
    assert counted_flops(model, shape) <= total <= 1.1 * counted_flops(model, shape)  # MobileNet: ~6%


def test_unknown_model_and_too_small_images():
    with pytest.raises(UsageError, match="unknown model 'vgg'"):
        networks.model_specs("vgg", (1, 8, 8), 10)
    with pytest.raises(UsageError, match="too small"):
        networks.model_specs("cnn", (1, 3, 3), 10)
    with pytest.raises(UsageError, match="too small"):
        networks.model_specs("vgg16", (3, 16, 16), 10)  # five 2x2 max-pools need 32 px
