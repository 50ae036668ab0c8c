"""What the Horovod data-parallel runners of both frameworks share.

Every rank is a replica holding the whole model; rank 0 logs and saves. The
runners (train_torch/data_parallel.py, train_tf/data_parallel.py) call these
with their framework's Horovod module and model state; only Horovod's
framework-neutral calls are used here.
"""

from __future__ import annotations

import os
from typing import Callable, Optional

from common.checkpoint import NeutralState
from common.config import RunConfig
from common.plan import make_plan
from common.runner import OpenCheckpoint
from common.timeline import Timeline


def request_horovod_timeline(config: RunConfig) -> None:
    """--timeline in data mode: Horovod's own timeline (written by rank 0: negotiation,
    queueing and each allreduce of every gradient). Its file is known only once the ranks
    have agreed on the run directory, after hvd.init, so it is started then."""
    if config.timeline:
        os.environ["HOROVOD_TIMELINE"] = "DYNAMIC"


def start_horovod_timeline(hvd, config: RunConfig) -> None:
    """On every rank (Horovod's coordinator writes it)."""
    if config.timeline:
        hvd.start_timeline(os.path.abspath(config.timeline))


def apply_data_layout(runner, hvd, config: RunConfig) -> None:
    """Set the runner's place from Horovod (again after an elastic reset)."""
    runner.rank, runner.world_size = hvd.rank(), hvd.size()
    runner.plan = make_plan(config, runner.world_size)
    runner.primary = runner.rank == 0  # Horovod: rank 0 alone logs and saves.
    runner.data_shards, runner.data_shard = runner.world_size, runner.rank
    runner.timeline = Timeline()  # the project's own spans are for pipelines; Horovod traces data mode


def primary_shard(primary: bool, state: Callable[[], NeutralState]) -> Optional[tuple[int, NeutralState]]:
    """Every rank holds the whole model: rank 0 writes it as the only shard."""
    return (0, state()) if primary else None


def read_on_primary(primary: bool, open_checkpoint: Optional[OpenCheckpoint], keys,
                    optimizer: Optional[str]) -> Optional[NeutralState]:
    """The checkpoint's state on rank 0 (which then broadcasts it), None elsewhere."""
    if not primary or open_checkpoint is None:
        return None
    return open_checkpoint().state(keys, optimizer)

