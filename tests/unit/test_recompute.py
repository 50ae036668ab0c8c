"""--recompute runs each layer's forward again at the backward, in both frameworks, and the
gradients and BatchNorm's running statistics come out as without it."""

import contextlib

import numpy as np
import pytest
import tensorflow as tf
import torch

from common.model import networks
from train_tf import model as tf_model
from train_torch import model as torch_model

SHAPE = (3, 16, 16)
SPECS = networks.model_specs("resnet8", SHAPE, 10, dropout=0.3)
FROZEN = tf_model.frozen_batch_norm_statistics
IMAGES = np.random.default_rng(0).standard_normal((6, *SHAPE)).astype(np.float32)


def torch_step(recompute, calls):
    model = torch_model.build_model(SPECS, SHAPE, 0).train()
    model.recompute = recompute
    for layer in model:
        layer.register_forward_pre_hook(lambda *_: calls.append(1))  # (a recomputation stops once it has
        # given back what the backward needs, before any forward hook would run)
    model(torch.from_numpy(IMAGES), torch.arange(6)).square().sum().backward()
    return [p.grad.numpy().copy() for p in model.parameters()], [b.numpy().copy() for b in model.buffers()]


def tf_step(recompute, calls, monkeypatch, freeze=FROZEN):
    model = tf_model.build_model(SPECS, SHAPE, 0)
    model.recompute = recompute
    def counted():
        calls.append(1)  # at trace time: once per layer the backward runs again
        return freeze()
    monkeypatch.setattr(tf_model, "frozen_batch_norm_statistics", counted)

    @tf.function
    def step(images):
        with tf.GradientTape() as tape:
            out = model(images, training=True, dropout_keys=tf.range(6, dtype=tf.int64))
            loss = tf.reduce_sum(tf.square(out))
        return tape.gradient(loss, model.trainable_variables)
    gradients = step(tf.constant(IMAGES.transpose(0, 2, 3, 1)))
    return [g.numpy() for g in gradients], [v.numpy() for v in model.non_trainable_variables]


def assert_alike(first, second):
    for a, b in zip(first, second):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_pytorch_runs_each_layer_again_and_gets_the_same_gradients_and_statistics():
    kept_calls, again_calls = [], []
    kept, again = torch_step(False, kept_calls), torch_step(True, again_calls)
    # Every layer runs again but the global pool, whose backward keeps nothing to recompute.
    assert len(kept_calls) == len(SPECS) and len(again_calls) == 2 * len(SPECS) - 1
    assert_alike(kept[0], again[0])
    assert_alike(kept[1], again[1])


def test_pytorch_statistics_would_move_twice_without_the_freeze(monkeypatch):
    kept = torch_step(False, [])
    monkeypatch.setattr(torch_model, "frozen_batch_norm", lambda module: torch.enable_grad())
    again = torch_step(True, [])
    assert not all(np.allclose(a, b) for a, b in zip(kept[1], again[1]))


def test_tensorflow_runs_each_layer_again_and_gets_the_same_gradients_and_statistics(monkeypatch):
    kept_calls, again_calls = [], []
    kept, again = tf_step(False, kept_calls, monkeypatch), tf_step(True, again_calls, monkeypatch)
    assert len(kept_calls) == 0 and len(again_calls) == len(SPECS)
    assert_alike(kept[0], again[0])
    assert_alike(kept[1], again[1])


def test_tensorflow_statistics_would_move_twice_without_the_freeze(monkeypatch):
    kept = tf_step(False, [], monkeypatch)
    unfrozen = tf_step(True, [], monkeypatch, freeze=contextlib.nullcontext)
    assert not all(np.allclose(a, b) for a, b in zip(kept[1], unfrozen[1]))


@pytest.mark.parametrize("framework", ["torch", "tf"])
def test_evaluation_never_recomputes(framework):
    if framework == "torch":
        model = torch_model.build_model(SPECS, SHAPE, 0).eval()
        model.recompute = True
        with torch.no_grad():
            out = model(torch.from_numpy(IMAGES))
        assert out.grad_fn is None
    else:
        model = tf_model.build_model(SPECS, SHAPE, 0)
        model.recompute = True
        assert model(tf.constant(IMAGES.transpose(0, 2, 3, 1)), training=False).shape == (6, 10)
