"""Dynamic loss scaling for --amp fp16, as torch.amp.GradScaler does it (pure bookkeeping).

fp16 holds magnitudes up to 65504 and down to ~6e-8: small gradients vanish
unless the loss is scaled up before backward. The scale starts high; a step
whose (allreduced, unscaled) gradients hold an inf or NaN is skipped and the
scale halved; after ``GROWTH_INTERVAL`` clean steps in a row it doubles.
train_tf uses this class; train_torch uses GradScaler itself, with the same
constants and the same log line.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from common.core import metrics

BACKOFF, GROWTH, GROWTH_INTERVAL = 0.5, 2.0, 2000  # GradScaler's defaults


def report_skip(before: float, after: float) -> None:
    metrics.log(f"amp fp16: gradients overflowed at loss scale {before:g}; step skipped, scale now {after:g}")


@dataclass
class DynamicLossScale:
    scale: float = 65536.0
    clean_steps: int = 0

    def record(self) -> dict:
        """What a checkpoint keeps (its meta), so that a resumed run goes on at this scale."""
        return {"scale": float(self.scale), "clean_steps": int(self.clean_steps)}

    @staticmethod
    def from_record(record: object) -> DynamicLossScale | None:
        """The scale a checkpoint recorded (None when it holds none or a malformed one)."""
        if not isinstance(record, dict):
            return None
        scale, clean_steps = record.get("scale"), record.get("clean_steps")
        if not isinstance(scale, (int, float)) or not isinstance(clean_steps, int) or \
                not (math.isfinite(scale) and scale > 0 and clean_steps >= 0):
            return None
        return DynamicLossScale(float(scale), clean_steps)

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
