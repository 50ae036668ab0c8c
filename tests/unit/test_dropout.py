"""Seeded dropout (no MPI): masks hashed from (seed, epoch, sample, layer, unit), the
same in numpy, PyTorch and TensorFlow. (A pipeline cut keeps them: tests/unit/test_stages.py.)"""

import numpy as np
import pytest
import tensorflow as tf
import torch

from common.core.config import parse_config
from common.core.errors import UsageError
from common.model import dropout, networks
from train_tf import model as tf_model
from train_torch import model as torch_model

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
