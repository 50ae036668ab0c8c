"""Learning-rate rules shared by both frameworks (pure functions of the step)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from common.core.config import RunConfig


def warmup_epochs(config: RunConfig, world_size: int) -> float:
    if config.warmup_epochs >= 0:
        return config.warmup_epochs
    # Weak scaling multiplies the LR by the world size; ramp up to it as Goyal
    # et al. (and Horovod's examples) do, so early steps do not diverge.
    return 1.0 if config.weak_scaling and world_size > 1 else 0.0


def peak_lr(config: RunConfig, world_size: int) -> float:
    """--lr is for the global batch; with --batch-size-per-rank it scales with the ranks."""
    return config.lr * world_size if config.weak_scaling else config.lr


def lr_at(step: int, steps_per_epoch: int, config: RunConfig, world_size: int) -> float:
    """LR for global optimizer step ``step`` (0-based): linear warmup, then constant, or
    with --lr-schedule cosine decaying to zero at the last step of --epochs."""
    peak = peak_lr(config, world_size)
    warmup_steps = warmup_epochs(config, world_size) * steps_per_epoch
    if warmup_steps <= 0 or step >= warmup_steps:
        if config.lr_schedule == "cosine":
            decay_steps = max(1.0, config.epochs * steps_per_epoch - warmup_steps)
            return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup_steps) / decay_steps)))
        return peak
    start = config.lr if config.weak_scaling else 0.0
    return start + (peak - start) * (step + 1) / warmup_steps
