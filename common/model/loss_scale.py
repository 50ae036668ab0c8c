"""Dynamic loss scaling for --amp fp16, as torch.amp.GradScaler does it (pure bookkeeping).

fp16 holds magnitudes up to 65504 and down to ~6e-8: small gradients vanish
unless the loss is scaled up before backward. The scale starts high; a step
whose (allreduced, unscaled) gradients hold an inf or NaN is skipped and the
scale halved; after ``GROWTH_INTERVAL`` clean steps in a row it doubles.
train_tf uses this class; train_torch uses GradScaler itself, with the same
constants and the same log line.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.core import metrics

BACKOFF, GROWTH, GROWTH_INTERVAL = 0.5, 2.0, 2000  # GradScaler's defaults


def report_skip(before: float, after: float) -> None:
    metrics.log(f"amp fp16: gradients overflowed at loss scale {before:g}; step skipped, scale now {after:g}")


@dataclass
class DynamicLossScale:
    scale: float = 65536.0
    clean_steps: int = 0

    def update(self, finite: bool, primary: bool) -> bool:
        """After a step's gradients were checked: whether to apply them (the scale moves)."""
        if not finite:
            before, self.scale, self.clean_steps = self.scale, self.scale * BACKOFF, 0
            if primary:
                report_skip(before, self.scale)
            return False
        self.clean_steps += 1
        if self.clean_steps == GROWTH_INTERVAL:
            self.scale, self.clean_steps = self.scale * GROWTH, 0
        return True
