"""Point-to-point transport between pipeline stages: mpi4py over numpy buffers.

Upper-case (buffer) Isend/Irecv only, so nothing is pickled on the hot path.
Shapes are never sent: both neighbours derive every message's shape from the
layer specs and the micro-batch sizes, which each computes from the same
sharding. All receives of a step are posted up front and sends never block,
so communication overlaps compute and no send/send cycle can deadlock.
"""

from __future__ import annotations

import numpy as np

ACTIVATION, GRADIENT = 0, 1


def tag(kind: int, microbatch: int) -> int:
    """One tag per (message kind, micro-batch); MPI keeps same-tag messages in order."""
    return 2 * microbatch + kind


class Transport:
    def __init__(self, comm):
        self.comm = comm
        self._sends = []
        self._receives = {}

    def post_receive(self, kind, microbatch, source, shape, dtype=np.float32):
        buffer = np.empty(shape, dtype=dtype)
        request = self.comm.Irecv(buffer, source=source, tag=tag(kind, microbatch))
        self._receives[(kind, microbatch)] = (buffer, request)

    def receive(self, kind, microbatch):
        """Wait for a posted receive and return its buffer."""
        buffer, request = self._receives.pop((kind, microbatch))
        request.Wait()
        return buffer

    def send(self, array, kind, microbatch, dest):
        array = np.ascontiguousarray(array)
        # Keep the array alive until the send completes.
        self._sends.append((array, self.comm.Isend(array, dest=dest, tag=tag(kind, microbatch))))

    def finish(self):
        """Complete every send of the step (their buffers may then be reused)."""
        from mpi4py import MPI

        MPI.Request.Waitall([request for _, request in self._sends])
        self._sends.clear()
        if self._receives:
            raise RuntimeError(f"receives never consumed: {sorted(self._receives)}")
