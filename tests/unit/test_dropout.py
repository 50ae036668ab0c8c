"""Seeded dropout (no MPI): masks hashed from (seed, epoch, sample, layer, unit), the
same in numpy, PyTorch and TensorFlow, and a pipeline cut that keeps them (TensorFlow's
stages recompute their forward at the backward and must draw the same masks again)."""

import numpy as np
import pytest
import tensorflow as tf
import torch

from common.core.config import parse_config
from common.core.errors import UsageError
from common.core.runner import StagePlace
from common.data.batches import Batch
from common.model import dropout, networks
from tests.helpers import relative_difference
from train_tf import model as tf_model
from train_tf.stage import TfStage
from train_torch import model as torch_model
from train_torch.stage import TorchStage

INDICES = np.arange(1000, 1064)


@pytest.mark.parametrize("rate", [0.1, 0.2, 0.5])
def test_keeps_one_minus_rate_of_the_units_scaled_up(rate):
    mask = dropout.reference_mask(dropout.sample_keys(0, 0, INDICES), 4096, 5, rate)
    kept = mask > 0
    # 262,144 draws: the share's standard error is below 1e-3.
    assert abs(kept.mean() - (1 - rate)) < 5e-3
    assert np.all(mask[kept] == np.float32(1 / (1 - rate)))
    # Every sample and every unit has its own draws (no row or column repeats).
    assert 0.25 < kept.mean(axis=1).min() and kept.mean(axis=0).min() > 0.2
    assert len({row.tobytes() for row in kept}) == len(INDICES)


def test_rate_zero_keeps_everything():
    assert np.all(dropout.reference_mask(dropout.sample_keys(3, 1, INDICES), 100, 2, 0.0) == 1)


def test_a_samples_mask_depends_on_seed_epoch_index_and_layer_not_on_its_batch():
    keys = dropout.sample_keys(7, 2, INDICES)
    # The same sample in another batch, at another position: the same key.
    assert dropout.sample_keys(7, 2, INDICES[::-1])[-1] == keys[0]
    assert np.array_equal(dropout.sample_keys(7, 2, INDICES[10:20]), keys[10:20])
    base = dropout.reference_mask(keys, 512, 3, 0.5) > 0
    others = {"seed": dropout.reference_mask(dropout.sample_keys(8, 2, INDICES), 512, 3, 0.5),
              "epoch": dropout.reference_mask(dropout.sample_keys(7, 3, INDICES), 512, 3, 0.5),
              "layer": dropout.reference_mask(keys, 512, 4, 0.5),
              "index": dropout.reference_mask(dropout.sample_keys(7, 2, INDICES + 1), 512, 3, 0.5)}
    for name, other in others.items():
        agreement = ((other > 0) == base).mean()
        assert abs(agreement - 0.5) < 0.02, name  # independent draws agree half the time


def test_the_zoo_drops_where_torchvision_does_and_dropout_overrides():
    def rates(name, shape=(3, 32, 32), rate=None):
        return [spec.dropout for spec in networks.model_specs(name, shape, 10, dropout=rate)
                if isinstance(spec, networks.Dense)]
    assert rates("vgg16") == [0.0, 0.5, 0.5] and rates("vgg11_bn") == [0.0, 0.5, 0.5]
    assert rates("mobilenet_v2") == [0.2]
    assert rates("resnet18") == [0.0] and rates("cnn") == [0.0, 0.0]
    assert rates("cnn", rate=0.3) == [0.0, 0.3] and rates("vgg11", rate=0.0) == [0.0, 0.0, 0.0]
    assert not networks.drops(networks.model_specs("vgg11", (3, 32, 32), 10, dropout=0.0))


@pytest.mark.parametrize("value", ["1", "-0.1", "1.5"])
def test_dropout_outside_zero_to_one_is_a_usage_error(value):
    with pytest.raises(UsageError, match="--dropout must be in"):
        parse_config(["--dropout", value])


def test_torch_and_tf_masks_are_numpys():
    keys = dropout.sample_keys(0, 4, INDICES)
    expected = dropout.reference_mask(keys, 300, 9, 0.3)
    torch_mask = torch_model.seeded_dropout_mask(torch.from_numpy(keys), 300, 9, 0.3, torch.float32)
    compiled = tf.function(lambda k: tf_model.seeded_dropout_mask(k, 300, 9, 0.3, tf.float32))
    assert np.array_equal(torch_mask.numpy(), expected)
    assert np.array_equal(tf_model.seeded_dropout_mask(tf.constant(keys), 300, 9, 0.3, tf.float32).numpy(), expected)
    assert np.array_equal(compiled(tf.constant(keys)).numpy(), expected)


# --- stages: a pipeline cut draws the whole model's masks ----------------------------

SHAPE = (2, 3, 3)
SPECS = (networks.Flatten(), networks.Dense(24, relu=True), networks.Dense(16, relu=True, dropout=0.5),
         networks.Dense(10, dropout=0.5))


class HandOverFeed:
    """What a stage needs of a feed when its inputs arrive as tensors: labels."""
    memory_format = torch.contiguous_format

    def __init__(self, framework):
        self.framework = framework

    def arrive(self, batch):
        return batch

    def labels(self, batch):
        return torch.from_numpy(batch.labels) if self.framework == "torch" else tf.constant(batch.labels)


def stage(framework, specs, start, end, last):
    """A stage fed activations (never the first: it reads no images)."""
    config = parse_config(["--lr", "0.1"])
    place = StagePlace(tuple(specs), SHAPE, start, end, False, last, config, 0, HandOverFeed(framework))
    return (TorchStage if framework == "torch" else TfStage)(place)


def through_stages(framework, specs, cuts, x, batch):
    """One micro-batch through stages [start, end) in ``cuts``, then one SGD step: every
    parameter gradient in order (one flat vector), the input's gradient, and the weights
    after the step (each stage's, neutral layout)."""
    stages = [stage(framework, specs, start, end, end == len(specs)) for start, end in cuts]
    for piece in stages:
        piece.zero_grad()
    inputs = torch.from_numpy(x) if framework == "torch" else tf.constant(x)
    for piece in stages:
        inputs, _ = piece.forward(0, inputs, batch, 1.0 / batch.count)
        inputs = inputs.detach() if framework == "torch" and inputs is not None else inputs  # as the wire does
    gradient = None
    for piece in reversed(stages):
        gradient = piece.backward(0, gradient)
    vector = np.concatenate([piece.gradient_vector() for piece in stages])
    for piece in stages:
        piece.step()
    return vector, np.asarray(gradient), [piece.state().weights for piece in stages]


@pytest.mark.parametrize("framework", ["torch", "tf"])
def test_a_cut_model_draws_the_whole_models_masks(framework):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, *SHAPE)).astype(np.float32)
    batch = Batch(INDICES[:6], labels=rng.integers(0, 10, 6), epoch=1)
    whole, whole_input, _ = through_stages(framework, SPECS, [(0, 4)], x, batch)
    # Layer 2 drops in the first stage, which (in TensorFlow) recomputes its forward at the backward.
    cut, cut_input, _ = through_stages(framework, SPECS, [(0, 3), (3, 4)], x, batch)
    assert relative_difference(cut, whole) <= 1e-6
    assert relative_difference(cut_input, whole_input) <= 1e-6
    # The masks matter: without dropout, or in another epoch, the gradients are others.
    plain = [networks.Dense(spec.units, spec.relu) if isinstance(spec, networks.Dense) else spec for spec in SPECS]
    assert relative_difference(through_stages(framework, plain, [(0, 4)], x, batch)[0], whole) > 0.1
    later = Batch(batch.indices, batch.labels, epoch=2)
    assert relative_difference(through_stages(framework, SPECS, [(0, 4)], x, later)[0], whole) > 0.1


def test_both_frameworks_stages_take_the_same_step_with_dropout():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, *SHAPE)).astype(np.float32)
    batch = Batch(INDICES[5:10], labels=rng.integers(0, 10, 5), epoch=0)
    before = torch_model.to_neutral(torch_model.build_model(list(SPECS), SHAPE, parse_config([]).seed))
    _, torch_input, torch_after = through_stages("torch", SPECS, [(0, 3), (3, 4)], x, batch)
    _, tf_input, tf_after = through_stages("tf", SPECS, [(0, 3), (3, 4)], x, batch)
    assert relative_difference(tf_input, torch_input) <= 1e-5
    offsets = {0: 0, 1: 3}  # the second stage's layer 0 is the model's layer 3
    for stage_index, (torch_weights, tf_weights) in enumerate(zip(torch_after, tf_after)):
        assert sorted(tf_weights) == sorted(torch_weights)
        for key, value in torch_weights.items():
            layer, rest = key.split(".", 1)
            initial = before[f"{int(layer) + offsets[stage_index]}.{rest}"]
            assert np.abs(value - initial).max() > 0, key
            assert relative_difference(tf_weights[key] - initial, value - initial) <= 1e-5, key
