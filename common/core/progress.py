"""One progress bar for the whole run, on the rank that reports, and only on a terminal.

A rank started by horovodrun, mpirun or srun writes to pipes that the launcher reads
and tags line by line, so a bar drawn on them arrives as fragments with rank tags in
the middle. The bar is therefore drawn on the rank's stderr when that is a terminal
(one process), else on the controlling terminal (/dev/tty) a launcher started from a
terminal leaves its local ranks, and not at all when there is none (a log file, CI,
a batch job): the epoch lines are the record.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from typing import TextIO

from common.launch.environment import launcher_world_size


def terminal() -> TextIO | None:
    if sys.stderr.isatty():
        return sys.stderr
    if launcher_world_size() > 1:
        try:
            return open("/dev/tty", "w", encoding="utf-8")  # noqa: SIM115 - closed with the bar
        except OSError:
            return None
    return None


class ProgressBar:
    """Steps of the whole run with the epoch, the running loss, images/s and the ETA."""

    def __init__(self, enabled: bool, epochs: int, steps_per_epoch: int, done_steps: int):
        self.bar, self.stream, self.epochs = None, None, epochs
        if not enabled or epochs * steps_per_epoch <= done_steps:
            return
        self.stream = terminal()
        if self.stream is None:
            return
        from tqdm import tqdm
        self.bar = tqdm(total=epochs * steps_per_epoch, initial=done_steps, file=self.stream, unit="step",
                        dynamic_ncols=True, mininterval=0.5, leave=False)

    def step(self, epoch: int, loss: float, images_per_sec: float) -> None:
        if self.bar is None:
            return
        self.bar.set_description(f"epoch {epoch + 1}/{self.epochs}", refresh=False)
        self.bar.set_postfix_str(f"loss {loss:.3f}, {images_per_sec:,.0f} img/s", refresh=False)
        self.bar.update(1)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Around a log line: the bar steps aside and comes back under it. On the controlling
        terminal the line travels through the launcher and arrives a moment later, so the
        bar stays away for its usual refresh interval instead of coming back at once."""
        if self.bar is not None:
            self.bar.clear()
        try:
            yield
        finally:
            if self.bar is not None and self.stream is sys.stderr:
                self.bar.refresh()
            elif self.bar is not None:
                self.bar.last_print_t = time.time()  # tqdm redraws mininterval after this

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            if self.stream is not None and self.stream is not sys.stderr:
                self.stream.close()
            self.bar = None
