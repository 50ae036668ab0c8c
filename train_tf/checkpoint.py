"""TensorFlow checkpoints in TF's native format: a ckpt-epochNNNN.tf directory
holding tf.train.Checkpoint files (model and optimizer variables) and meta.json
(format, epoch, architecture, config)."""

import dataclasses
import json
import os

import tensorflow as tf

from common import checkpoint as common_checkpoint
from common import models
from common.errors import UsageError

EXTENSION = "tf"
FORMAT = "cnn-parallel-tensorflow/1"
PREFIX = "state"
META = "meta.json"


def _trackables(model, architecture, optimizer=None):
    from train_tf.model import named_variables

    objects = {"model": named_variables(model, tuple(architecture["input_shape"]))}
    if optimizer is not None:
        objects["optimizer"] = optimizer.variables
    return objects


def write(directory, position, model, optimizer, config, architecture):
    epoch, step = position
    os.makedirs(directory)
    tf.train.Checkpoint(**_trackables(model, architecture, optimizer)).write(os.path.join(directory, PREFIX))
    with open(os.path.join(directory, META), "w", encoding="utf-8") as handle:
        json.dump({"format": FORMAT, "epoch": epoch, "step": step, "architecture": architecture,
                   "config": dataclasses.asdict(config)}, handle)


def read_meta(directory, architecture):
    try:
        with open(os.path.join(directory, META), encoding="utf-8") as handle:
            meta = json.load(handle)
        if meta.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} checkpoint")
    except Exception as error:  # missing, truncated or foreign
        raise UsageError(f"cannot load checkpoint {directory} ({type(error).__name__}: {error}); "
                         "move it away to resume from the previous one, or start fresh") from None
    common_checkpoint.check_architecture(meta["architecture"], architecture, directory)
    return meta


def _read(directory, objects):
    try:
        status = tf.train.Checkpoint(**objects).read(os.path.join(directory, PREFIX))
        # Every variable we asked for must have been in the file.
        status.assert_existing_objects_matched().expect_partial()
    except Exception as error:  # truncated or corrupt variable files
        raise UsageError(f"cannot load checkpoint {directory} ({type(error).__name__}: "
                         f"{str(error).splitlines()[0]}); move it away or start fresh") from None


def load(directory, architecture, model, optimizer):
    """Restore model and optimizer from ``directory``; returns its (epoch, step)."""
    meta = read_meta(directory, architecture)
    _read(directory, _trackables(model, architecture, optimizer))
    return meta["epoch"], meta.get("step", 0)


def read_neutral(directory, architecture):
    """The model weights of a .tf checkpoint in the neutral layout (common/weights.py)."""
    from train_tf.model import build_model, to_neutral

    read_meta(directory, architecture)
    shape = tuple(architecture["input_shape"])
    model = build_model(models.model_specs(architecture["model"], shape, architecture["num_classes"]),
                        shape, seed=0)
    _read(directory, _trackables(model, architecture))
    return to_neutral(model, shape)


def read_weights(path, architecture):
    """Neutral weights from a checkpoint of either framework."""
    if os.path.isdir(path):
        return read_neutral(path, architecture)
    from train_torch.checkpoint import read_neutral as read_pytorch
    return read_pytorch(path, architecture)
