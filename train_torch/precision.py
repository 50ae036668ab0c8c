"""--amp: autocast (bf16, or fp16 with dynamic loss scaling) around PyTorch's forward passes.

Weights, optimizer state and checkpoints stay float32: autocast runs the
convolutions and matmuls in the low precision and keeps reductions (the loss,
BatchNorm's statistics) in float32. fp16's narrow range needs the loss scaled
up before backward and the gradients scaled down before the step; a step whose
gradients overflowed is skipped and the scale halved (torch.amp.GradScaler).
"""

import contextlib

import torch

from common.core.config import Amp
from common.model.loss_scale import BACKOFF, GROWTH, GROWTH_INTERVAL, DynamicLossScale, report_skip

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(config, device):
    """The context a forward pass runs in (a no-op without --amp)."""
    if config.amp == Amp.OFF:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[config.amp])


class LossScaler:
    """torch.amp.GradScaler for --amp fp16 that also says when it skipped a step.

    ``scale(loss)`` before backward; ``step(optimizer, synchronize)`` after it:
    Horovod's allreduce first (so every rank sees the same overflow), then the
    unscale, the check, and the step or its skip."""

    def __init__(self, config, device, primary):
        self.scaler = torch.amp.GradScaler(device.type, init_scale=config.loss_scale, growth_factor=GROWTH,
                                           backoff_factor=BACKOFF, growth_interval=GROWTH_INTERVAL)
        self.primary = primary

    def scale(self, loss):
        return self.scaler.scale(loss)

    def state(self) -> DynamicLossScale:
        return DynamicLossScale(self.scaler.get_scale(), int(self.scaler.state_dict().get("_growth_tracker", 0)))

    def restore(self, state: DynamicLossScale) -> None:
        self.scaler.load_state_dict({**self.scaler.state_dict(), "scale": state.scale,
                                     "_growth_tracker": state.clean_steps})

    def step(self, optimizer, synchronize):
        synchronize()
        self.scaler.unscale_(optimizer)
        before = self.scaler.get_scale()
        with optimizer.skip_synchronize():
            self.scaler.step(optimizer)
        self.scaler.update()
        if self.primary and self.scaler.get_scale() < before:
            report_skip(before, self.scaler.get_scale())
