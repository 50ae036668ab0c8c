"""torch.optim SGD/Adam from the config (train_tf/optimizer.py mirrors their rules)."""

import torch


def make_local_optimizer(model, config):
    if config.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                               weight_decay=config.weight_decay)
    return torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)

