"""PyTorch checkpoints: torch.save of model, optimizer, epoch, RNG and config."""

import dataclasses
import random

import numpy as np
import torch

from common import checkpoint as common_checkpoint
from common.errors import UsageError

EXTENSION = "pt"
FORMAT = "cnn-parallel-torch/1"


def save(directory, epoch, model, optimizer, config, architecture, keep):
    state = {
        "format": FORMAT, "epoch": epoch, "architecture": architecture,
        "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        "config": dataclasses.asdict(config),
        "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                "python": random.getstate()},
    }
    path = common_checkpoint.checkpoint_path(directory, epoch, EXTENSION)
    common_checkpoint.atomic_save(path, lambda temporary: torch.save(state, temporary))
    common_checkpoint.prune(directory, EXTENSION, keep)
    return path


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


def latest(directory):
    found = common_checkpoint.list_checkpoints(directory, EXTENSION)
    return found[-1][1] if found else None


def restore(state, model, optimizer):
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"]["torch"])
    np.random.set_state(state["rng"]["numpy"])
    random.setstate(state["rng"]["python"])
