"""MPI pieces shared by the pipeline and parameter-server runners: their common skeleton,
collectives over an mpi4py communicator, and where a rank sits on its node."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from common.core.config import RunConfig
from common.launch.cpu_budget import cpus_per_rank
from common.observe.timeline import Timeline, gather_timeline, start_timeline


class MpiRunner:
    """What the pipeline and parameter-server runners share around their own steps: the
    project's --timeline over their communicator (one track per rank, labelled by
    ``track_label``), and no loss scale (--amp fp16 is for data mode: config.validate)."""

    comm: Any
    config: RunConfig
    timeline: Timeline
    timeline_path: str = ""
    layer_costs: Sequence[float] = ()  # the pipeline's cut sets its own
    last_piece_costs: Sequence[float] = ()
    stashes_inputs_only = False  # the pipeline says where its stages recompute

    @property
    def track_label(self) -> str:
        raise NotImplementedError

    def start_timeline(self, path: str) -> None:
        self.timeline_path = path
        self.timeline = start_timeline(self.comm, self.config)

    def write_timeline(self) -> None:
        gather_timeline(self.comm, self.timeline, self.timeline_path, self.track_label)

    def loss_scale(self) -> None:
        return None

    def restore_loss_scale(self, state) -> None:
        pass


def node_placement(comm, config: RunConfig) -> tuple[int, int]:
    """(local rank, compute threads) of this rank on its node."""
    from mpi4py import MPI

    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    return node.rank, config.threads or cpus_per_rank(node.size)


class MpiCollectives:
    """Collectives over an mpi4py communicator, ``root`` answering broadcasts."""

    def __init__(self, comm, root: int):
        self.comm, self.root = comm, root

    def allreduce_sums(self, sums: np.ndarray, name: str) -> np.ndarray:
        from mpi4py import MPI

        total = np.zeros_like(sums)
        self.comm.Allreduce(np.ascontiguousarray(sums), total, op=MPI.SUM)
        return total

    def broadcast_object(self, value, name: str):
        return self.comm.bcast(value, root=self.root)

    def allgather_object(self, value, name: str) -> list:
        return self.comm.allgather(value)

    def flag_sum(self, value: int) -> int:
        return self.start_flag_sum(value)()

    def start_flag_sum(self, value: int) -> Callable[[], int]:
        from mpi4py import MPI

        buffers = np.array([int(value)], dtype=np.int64), np.zeros(1, dtype=np.int64)
        request = self.comm.Iallreduce(buffers[0], buffers[1], op=MPI.SUM)

        def answer():
            request.Wait()  # both buffers must live until here: MPI reads/writes them meanwhile
            return int(buffers[1][0])
        return answer
