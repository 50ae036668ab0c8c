"""PyTorch checkpoints: torch.save of model, optimizer, epoch, RNG and config."""

import dataclasses
import os
import random

import numpy as np
import torch

from common import checkpoint as common_checkpoint
from common import models
from common.errors import UsageError

EXTENSION = "pt"
FORMAT = "cnn-parallel-torch/1"


def write(path, position, model, optimizer, config, architecture):
    epoch, step = position
    torch.save({
        "format": FORMAT, "epoch": epoch, "step": step, "architecture": architecture,
        "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        "config": dataclasses.asdict(config),
        "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                "python": random.getstate()},
    }, path)


def load(path, architecture):
    """The checkpoint dict at ``path``; UsageError naming the file if it is unusable."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} checkpoint")
    except Exception as error:  # truncated, corrupt or foreign file
        raise UsageError(f"cannot load checkpoint {path} ({type(error).__name__}: {error}); "
                         "move it away to resume from the previous one, or start fresh") from None
    common_checkpoint.check_architecture(state["architecture"], architecture, path)
    return state


def position(state):
    return state["epoch"], state.get("step", 0)


def restore(state, model, optimizer):
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"]["torch"])
    np.random.set_state(state["rng"]["numpy"])
    random.setstate(state["rng"]["python"])


def read_neutral(path, architecture):
    """The model weights of a .pt checkpoint in the neutral layout (common/weights.py)."""
    from train_torch.model import build_model, to_neutral

    state = load(path, architecture)
    shape = tuple(architecture["input_shape"])
    model = build_model(models.model_specs(architecture["model"], shape, architecture["num_classes"]),
                        shape, seed=0)
    model.load_state_dict(state["model"])
    return to_neutral(model)


def read_weights(path, architecture):
    """Neutral weights from a checkpoint of either framework."""
    if os.path.isdir(path):
        from train_tf.checkpoint import read_neutral as read_tensorflow
        return read_tensorflow(path, architecture)
    return read_neutral(path, architecture)
