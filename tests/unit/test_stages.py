"""Pipeline stages of both frameworks driven by hand, in one process (no MPI): a cut model
computes what the whole model computes with seeded dropout in a non-last stage
(TensorFlow's stages recompute their forward at the backward and must draw the same masks
again), both frameworks' stages take the same step, and a blank sample (an unreadable
image, --skip-bad-images) carries no loss, and a backward cut into input and weight
gradients (--schedule zb) adds up what the whole backward computes."""

import numpy as np
import pytest
import tensorflow as tf
import torch

from common.core.config import parse_config
from common.core.runner import StagePlace
from common.data.batches import Batch
from common.model import networks
from tests.helpers import relative_difference
from train_tf.input import TfFeed
from train_tf.stage import TfStage
from train_torch import model as torch_model
from train_torch.input import TorchFeed
from train_torch.stage import TorchStage

INDICES = np.arange(1000, 1064)


SHAPE = (2, 3, 3)
SPECS = (networks.Flatten(), networks.Dense(24, relu=True), networks.Dense(16, relu=True, dropout=0.5),
         networks.Dense(10, dropout=0.5))
WITHOUT_DROPOUT = tuple(networks.Dense(spec.units, spec.relu) if isinstance(spec, networks.Dense) else spec
                        for spec in SPECS)


class HandOverFeed:
    """What a stage needs of a feed when its inputs arrive as tensors: labels, as the
    framework's own feed hands them over (blank samples' marked)."""
    memory_format = torch.contiguous_format

    def __init__(self, framework):
        self.framework = framework

    def arrive(self, batch):
        return batch

    def labels(self, batch):
        if self.framework == "torch":
            return TorchFeed.labels(self, Batch(batch.indices, torch.from_numpy(batch.labels), blank=batch.blank))
        return TfFeed.labels(self, Batch(batch.indices, tf.constant(batch.labels), blank=batch.blank))


def stage(framework, specs, start, end, last, schedule="1f1b"):
    """A stage fed activations (never the first: it reads no images)."""
    config = parse_config(["--lr", "0.1", "--schedule", schedule])
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
    assert relative_difference(through_stages(framework, WITHOUT_DROPOUT, [(0, 4)], x, batch)[0], whole) > 0.1
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


@pytest.mark.parametrize("framework", ["torch", "tf"])
def test_a_blank_sample_carries_no_loss(framework):
    """A batch of 6 with its third sample left blank (unreadable) steps as the batch of the
    other 5 does, at the same scale (the step still divides by the batch's size)."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((6, *SHAPE)).astype(np.float32)
    labels = rng.integers(0, 10, 6)
    blank = np.array([False, False, True, False, False, False])

    def last_stage_pass(batch, inputs):
        piece = stage(framework, WITHOUT_DROPOUT, 0, 4, True)
        piece.zero_grad()
        inputs = torch.from_numpy(inputs) if framework == "torch" else tf.constant(inputs)
        _, (loss_sum, correct) = piece.forward(0, inputs, batch, 1 / 6)
        piece.backward(0, None)
        return loss_sum, correct, piece.gradient_vector()

    with_blank = last_stage_pass(Batch(INDICES[:6], labels=labels, blank=blank), x)
    without = last_stage_pass(Batch(INDICES[:6][~blank], labels=labels[~blank]), x[~blank])
    assert with_blank[:2] == pytest.approx(without[:2], rel=1e-6)
    assert relative_difference(with_blank[2], without[2]) <= 1e-6
    scored_all = last_stage_pass(Batch(INDICES[:6], labels=labels), x)
    assert relative_difference(scored_all[2], without[2]) > 1e-2  # the blank sample's loss would move them


# Convolutions with and without BatchNorm, a residual block with a projection, depthwise
# convolutions, dense layers with dropout: each kind of layer whose weight gradient waits.
SPLIT_SPECS = (networks.Conv(4), networks.ResidualBlock(6, stride=2), networks.InvertedResidual(6, expand_ratio=2),
               networks.Flatten(), networks.Dense(12, relu=True, dropout=0.5), networks.Dense(10))


def split_backward(framework, cuts, x, batches, defer, weights=True, keep=None):
    """Micro-batches through stages cut at ``cuts``: whole backwards, or (``defer``) each
    backward cut in two, every weight-gradient part after all the input-gradient parts, in
    reverse order. The parameter gradients (one flat vector) and the input gradients."""
    schedule = "zb" if defer else "1f1b"
    stages = [stage(framework, SPLIT_SPECS, start, end, end == len(SPLIT_SPECS), schedule) for start, end in cuts]
    for piece in stages:
        piece.zero_grad()
        if keep is not None and not piece.last:
            piece.keeps_forward = keep  # TensorFlow: keep the forward on a tape, or recompute it
    input_gradients = []
    for m, batch in enumerate(batches):
        inputs = torch.from_numpy(x[batch.indices - INDICES[0]]) if framework == "torch" else \
            tf.constant(x[batch.indices - INDICES[0]])
        for piece in stages:
            inputs, _ = piece.forward(m, inputs, batch, 1.0 / len(x))
            inputs = inputs.detach() if framework == "torch" and inputs is not None else inputs
        gradient = None
        for piece in reversed(stages):
            gradient = (piece.backward_input if defer else piece.backward)(m, gradient)
        input_gradients.append(np.asarray(gradient))
    if defer and weights:
        for m in reversed(range(len(batches))):
            for piece in stages:
                piece.backward_weight(m)
    return np.concatenate([piece.gradient_vector() for piece in stages]), np.concatenate(input_gradients)


@pytest.mark.parametrize("framework", ["torch", "tf"])
def test_a_split_backward_adds_up_the_whole_backward(framework):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((8, *SHAPE)).astype(np.float32)
    labels = rng.integers(0, 10, 8)
    batches = [Batch(INDICES[part], labels=labels[part], epoch=0) for part in (slice(0, 5), slice(5, 8))]
    cuts = [(0, 2), (2, 5), (5, 6)]  # BatchNorm and dropout in the middle stage, the loss on the last
    whole, whole_inputs = split_backward(framework, cuts, x, batches, defer=False)
    split, split_inputs = split_backward(framework, cuts, x, batches, defer=True)
    assert relative_difference(split_inputs, whole_inputs) <= 1e-6
    assert relative_difference(split, whole) <= 1e-6
    # The weight-gradient parts carry most of the gradients: without them the sums are others.
    assert relative_difference(split_backward(framework, cuts, x, batches, True, weights=False)[0], whole) > 0.5


def test_a_tensorflow_stage_that_keeps_its_forward_computes_what_recomputing_does():
    """A TF stage before the last keeps its forward's intermediates on an eager tape or
    recomputes the forward at the backward, as the pipeline found faster; both give the
    same gradients, with BatchNorm, dropout and uneven micro-batches."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((8, *SHAPE)).astype(np.float32)
    labels = rng.integers(0, 10, 8)
    batches = [Batch(INDICES[part], labels=labels[part], epoch=0) for part in (slice(0, 5), slice(5, 8))]
    cuts = [(0, 2), (2, 5), (5, 6)]
    kept, kept_inputs = split_backward("tf", cuts, x, batches, defer=False, keep=True)
    recomputed, recomputed_inputs = split_backward("tf", cuts, x, batches, defer=False, keep=False)
    assert relative_difference(kept, recomputed) <= 1e-6
    assert relative_difference(kept_inputs, recomputed_inputs) <= 1e-6
    config = parse_config(["--lr", "0.1", "--batch-size", "8", "--microbatches", "2", "--mode", "model", "--pp", "2"])
    assert TfStage.keeping_is_faster(SPLIT_SPECS, SHAPE, 3, config) in (True, False)  # it times, whichever wins
