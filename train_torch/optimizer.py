"""torch.optim SGD/Adam from the config (train_tf/optimizer.py mirrors their rules)."""

import torch


def make_local_optimizer(model, config):
    if config.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                               weight_decay=config.weight_decay)
    return torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)


def optimizer_to_neutral(model, optimizer):
    """The optimizer's per-parameter state keyed by the neutral weight names."""
    from train_torch.model import named_tensors

    states = {}
    for key, tensor in named_tensors(model).items():
        state = optimizer.state.get(tensor)
        if state:
            states[key] = {name: value.detach().cpu().numpy().copy() for name, value in state.items()}
    return states


def load_optimizer_neutral(model, optimizer, states):
    from train_torch.model import named_tensors

    for key, tensor in named_tensors(model).items():
        if key in states:
            optimizer.state[tensor] = {name: torch.from_numpy(value.copy()).to(tensor.device)
                                       for name, value in states[key].items()}
