"""PyTorch model and optimizer <-> the neutral state that common/model/checkpoint.py stores.

The files themselves are written and read by common/model/checkpoint.py (safetensors +
JSON, the same for both frameworks); this only converts tensors to and from it.
"""

import torch

from common.model.checkpoint import NeutralState
from train_torch.model import load_neutral, named_tensors, to_neutral


def neutral_state(model, optimizer=None) -> NeutralState:
    """Weights and BatchNorm statistics, and torch.optim's per-parameter state, by neutral key."""
    return NeutralState(to_neutral(model), optimizer_slots(model, optimizer) if optimizer is not None else {})


def optimizer_slots(model, optimizer) -> dict:
    """torch.optim's per-parameter state as {neutral key: {slot: array}}."""
    slots = {}
    for key, tensor in named_tensors(model).items():
        state = optimizer.state.get(tensor)
        if state:
            slots[key] = {name: value.detach().cpu().numpy().copy() for name, value in state.items()}
    return slots


@torch.no_grad()
def load_neutral_state(model, optimizer, state: NeutralState) -> None:
    """Copy ``state`` into the model (and, where it has optimizer state, the optimizer)."""
    load_neutral(model, state.weights)
    if optimizer is not None:
        load_optimizer_state(model, optimizer, state.optimizer)


def load_optimizer_state(model, optimizer, slots: dict) -> None:
    """torch.optim's per-parameter state from {neutral key: {slot: array}}."""
    for key, tensor in named_tensors(model).items():
        if key in slots:
            # As torch.optim's own load_state_dict: Adam's step counter stays on the CPU.
            optimizer.state[tensor] = {name: torch.from_numpy(value.copy()).to("cpu" if name == "step" else
                                                                               tensor.device)
                                       for name, value in slots[key].items()}
