"""The zoo's networks train in real parallel jobs, in both frameworks (a few steps each).

The maths is proven elsewhere (TF = PyTorch per network in tests/unit/test_parity.py,
modes = one process in tests/parallel); this runs the real entry scripts so that
each network meets pipeline stages, replicas and the collectives of a real job.
"""

import json

import pytest

from tests.helpers import assert_ok, checkpoint_path, completed, relative_difference, run_training

SMALL = ["--dataset", "synthetic", "--synthetic-samples", 32, "--batch-size", 8, "--epochs", 1,
         "--steps-per-epoch", 2]


def image_shape(name):
    return ["--synthetic-shape", "3,32,32" if name.startswith("vgg") else "3,16,16"]  # VGG pools 5 times


MODES = {"data": (2, []), "model": (2, ["--mode", "model", "--pp", 2]),
         "hybrid": (4, ["--mode", "hybrid", "--pp", 2, "--sync-bn"])}
# PyTorch runs one network of each block type and family (basic, bottleneck, VGG-BN,
# inverted residual; the others are the same blocks in other numbers, whose specs
# tests/unit/test_models.py checks against torchvision) as a 2x2 hybrid with --sync-bn
# (stages, their replicas' allreduce, synchronised BatchNorm); TensorFlow, slower to start, three block types
# (basic, VGG-BN, inverted residual) in data or model mode: its hybrid path is the model
# path plus the replica allreduce of tests/parallel, and its bottleneck block is proven
# against PyTorch's in tests/unit/test_parity.py.
CASES = ([("torch", name, "hybrid") for name in ("resnet18", "resnet50", "vgg16_bn", "mobilenet_v2")]
         + [("tf", "resnet18", "model"), ("tf", "vgg16_bn", "model"), ("tf", "mobilenet_v2", "data")])


@pytest.mark.parametrize("framework,name,mode", CASES)
def test_network_trains_in_mode(tmp_path, framework, name, mode):
    np_, layout = MODES[mode]
    metrics_file = tmp_path / "metrics.jsonl"
    assert_ok(run_training([*SMALL, *image_shape(name), "--model", name, *layout, "--metrics-file", metrics_file],
                           np_=np_, framework=framework))
    record = json.loads(metrics_file.read_text())
    assert record["world_size"] == np_ and record["train_loss"] > 0


def test_zoo_checkpoint_crosses_frameworks_and_modes(tmp_path):
    """MobileNetV2 (depthwise convolutions, ReLU6, BatchNorm, dropout) trained by PyTorch in data
    mode (bf16), evaluated by TensorFlow as a 2-stage pipeline via --init-from: the same test loss."""
    directory = tmp_path / "torch"
    network = [*SMALL, *image_shape("mobilenet_v2"), "--model", "mobilenet_v2"]
    torch_run = assert_ok(run_training([*network, "--amp", "bf16", "--checkpoint-dir", directory], np_=2))
    tf_run = assert_ok(run_training([*network, "--epochs", 0, "--mode", "model", "--pp", 2,
                                     "--init-from", checkpoint_path(directory, 1)],
                                    np_=2, framework="tf"))
    # Evaluation runs in float32 in TF (no --amp), bf16 in torch: bf16's tolerance.
    assert relative_difference(completed(tf_run)["test_loss"], completed(torch_run)["test_loss"]) <= 2e-2
    # MobileNetV2 trains with torchvision's dropout, and its checkpoint says so.
    meta = json.loads((checkpoint_path(directory, 1) / "meta.json").read_text())
    assert meta["dropout"] == 0.2
