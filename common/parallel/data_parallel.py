"""What the Horovod data-parallel runners of both frameworks share.

Every rank is a replica holding the whole model; rank 0 logs and saves. The
runners (train_torch/data_parallel.py, train_tf/data_parallel.py) call these
with their framework's Horovod module and model state; only Horovod's
framework-neutral calls are used here.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from common.core import metrics
from common.core.config import RunConfig
from common.core.runner import OpenCheckpoint
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


def apply_data_layout(runner, hvd, config: RunConfig) -> None:
    """Set the runner's place from Horovod (again after an elastic reset)."""
    runner.rank, runner.world_size = hvd.rank(), hvd.size()
    runner.plan = make_plan(config, runner.world_size)
    runner.primary = runner.rank == 0  # Horovod: rank 0 alone logs and saves.
    runner.data_shards, runner.data_shard = runner.world_size, runner.rank
    runner.timeline = Timeline()  # the project's own spans are for pipelines; Horovod traces data mode


def primary_shard(primary: bool, state: Callable[[], NeutralState]) -> tuple[int, NeutralState] | None:
    """Every rank holds the whole model: rank 0 writes it as the only shard."""
    return (0, state()) if primary else None


def read_on_primary(primary: bool, open_checkpoint: OpenCheckpoint | None, keys,
                    optimizer: str | None) -> NeutralState | None:
    """The checkpoint's state on rank 0 (which then broadcasts it), None elsewhere."""
    if not primary or open_checkpoint is None:
        return None
    return open_checkpoint().state(keys, optimizer)


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
