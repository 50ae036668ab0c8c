"""What the Horovod data-parallel runners of both frameworks share.

Every rank is a replica holding the whole model; rank 0 logs and saves. The
runners (train_torch/data_parallel.py, train_tf/data_parallel.py) call these
with their framework's Horovod module and model state; only Horovod's
framework-neutral calls are used here.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from common.core import metrics
from common.core.config import RunConfig
from common.core.metrics import StepSums
from common.core.runner import OpenCheckpoint
from common.data.batches import Reads
from common.model.checkpoint import NeutralState
from common.observe.timeline import Timeline
from common.parallel.plan import make_plan


def request_horovod_timeline(config: RunConfig) -> None:
    """--timeline in data mode: Horovod's own timeline (written by rank 0: negotiation,
    queueing and each allreduce of every gradient). Its file is known only once the ranks
    have agreed on the run directory, after hvd.init, so it is started then."""
    if config.timeline:
        os.environ["HOROVOD_TIMELINE"] = "DYNAMIC"


def start_horovod_timeline(hvd, path: str) -> None:
    """On every rank (Horovod's coordinator writes it), into ``path`` ("": no timeline)."""
    if path:
        hvd.start_timeline(os.path.abspath(path))


# A bucket of gradients is allreduced as one group once the backward has produced all of
# it; smaller buckets start sooner, larger ones cost fewer negotiations.
BUCKET_BYTES = 4 << 20


def gradient_buckets(sizes: Sequence[int], limit: int = BUCKET_BYTES) -> list[list[int]]:
    """The gradients (by position; ``sizes`` in bytes, in the model's order) cut into buckets
    in the order the backward produces them, last layer first: each bucket closes once it
    holds ``limit`` bytes, the last holds what remains."""
    buckets: list[list[int]] = []
    current: list[int] = []
    filled = 0
    for index in reversed(range(len(sizes))):
        current.append(index)
        filled += sizes[index]
        if filled >= limit:
            buckets.append(current)
            current, filled = [], 0
    if current:
        buckets.append(current)
    return buckets


def apply_data_layout(runner, hvd, config: RunConfig) -> None:
    """Set the runner's place from Horovod (again after an elastic reset)."""
    runner.rank, runner.world_size = hvd.rank(), hvd.size()
    runner.plan = make_plan(config, runner.world_size)
    runner.primary = runner.rank == 0  # Horovod: rank 0 alone logs and saves.
    runner.data_shards, runner.data_shard = runner.world_size, runner.rank
    runner.timeline = Timeline()  # the project's own spans are for pipelines; Horovod traces data mode


class ReplicaRunner:
    """The skeleton of both frameworks' Horovod data runners: every rank a replica of the whole
    model, rank 0 the one that writes it (as the only checkpoint shard) and reads a checkpoint
    (then broadcasts it), the replicas' BatchNorm running statistics averaged before every
    evaluation and save. A framework's runner sets the attributes below (``apply_data_layout``
    the place) and supplies the arithmetic: the methods that raise here."""

    checkpoint_shards = 1
    layout: Sequence[str] = ()
    layer_costs: Sequence[float] = ()  # one piece: nothing was cut
    last_piece_costs: Sequence[float] = ()
    stashes_inputs_only = False  # one piece, the last: it keeps what the backward needs
    reads = Reads(images=True, labels=True)  # every replica trains on its share of each batch
    config: RunConfig
    hvd: Any                        # the framework's Horovod module
    keys: dict                      # the whole model's tensor names and shapes
    primary: bool
    world_size: int

    def start_timeline(self, path: str) -> None:
        start_horovod_timeline(self.hvd, path)

    def evaluate(self, batches: Iterable) -> StepSums:
        """Sums over this rank's slice of the test set (Horovod: each rank a slice)."""
        self.share_batch_norm_statistics()
        return self.evaluate_slice(batches)

    def checkpoint_shard(self) -> tuple[int, NeutralState] | None:
        self.share_batch_norm_statistics()
        return (0, self.neutral_state()) if self.primary else None

    def load_state(self, open_checkpoint: OpenCheckpoint | None, with_optimizer: bool) -> None:
        if self.primary and open_checkpoint is not None:
            self.load_neutral_state(open_checkpoint().state(self.keys,
                                                            self.config.optimizer if with_optimizer else None))
        self.broadcast_from_primary()

    def share_batch_norm_statistics(self) -> None:
        if self.world_size > 1 and not self.config.sync_bn:  # --sync-bn keeps them equal already
            self.average_batch_norm_statistics()

    # --- the framework's part ---------------------------------------------------------

    def evaluate_slice(self, batches: Iterable) -> StepSums:
        raise NotImplementedError

    def neutral_state(self) -> NeutralState:
        raise NotImplementedError

    def load_neutral_state(self, state: NeutralState) -> None:
        raise NotImplementedError

    def broadcast_from_primary(self) -> None:
        """Collective: every rank takes rank 0's model and optimizer state."""
        raise NotImplementedError

    def average_batch_norm_statistics(self) -> None:
        raise NotImplementedError


def run_elastic(runner, hvd, state, start: Callable[[], tuple], train_from: Callable, elastic_run: Callable):
    """Horovod elastic, alike in both frameworks: run ``train_from(position, commit)`` until it
    returns, restarting it from the last commit when a worker fails and from the current
    step when workers join or leave. ``state`` is the framework's Horovod State over the
    model and optimizer with ``epoch``, ``step`` and ``started`` attributes; ``elastic_run``
    the framework's elastic.run decorator. The global batch and LR are fixed, so the world
    size only changes how each batch is split (common/data/datasets.rank_batches), not what a step
    computes."""
    every = runner.config.elastic_commit_steps

    def commit(epoch, step):
        state.epoch, state.step = epoch, step
        if step % every == 0:  # includes the end of every epoch (step 0 of the next)
            state.commit()  # Horovod: keep a copy to roll back to; raises if hosts changed

    def on_reset():
        previous = runner.world_size
        apply_data_layout(runner, hvd, runner.config)  # Horovod: new ranks and world size
        if runner.primary:
            metrics.log(f"elastic: {previous} -> {runner.world_size} workers; continuing at epoch "
                        f"{state.epoch + 1}, step {state.step + 1}")

    state.register_reset_callbacks([on_reset])

    @elastic_run
    def train(state):
        # Horovod: the first call syncs every worker to rank 0's state, so a worker
        # that joins later sees started=True and must skip start()'s collectives.
        if not state.started:
            (state.epoch, state.step), state.started = start(), True
            state.commit()
        return train_from((state.epoch, state.step), commit)

    return train(state)
