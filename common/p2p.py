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


def tag(kind: int, microbatch: int, chunk: int = 0, chunks: int = 1) -> int:
    """One tag per (message kind, micro-batch, receiving chunk); MPI keeps same-tag
    messages in order."""
    return 2 * (microbatch * chunks + chunk) + kind


class Transport:
    """``chunks``: model pieces per rank (--schedule interleaved), each with its own messages."""

    def __init__(self, comm, chunks: int = 1):
        self.comm, self.chunks = comm, chunks
        self._sends = []
        self._receives = {}
        # Receive buffers live from step to step: a message's shape repeats every step,
        # and fresh large arrays cost page faults. A step's buffers are done with when
        # the step ends (forward inputs and output gradients are used within the step).
        self._buffers = {}

    def post_receive(self, kind, microbatch, chunk, source, shape, dtype=np.float32):
        key = (kind, microbatch, chunk)
        buffer = self._buffers.get(key)
        if buffer is None or buffer.shape != tuple(shape) or buffer.dtype != dtype:
            buffer = self._buffers[key] = np.empty(shape, dtype=dtype)
        request = self.comm.Irecv(buffer, source=source, tag=tag(kind, microbatch, chunk, self.chunks))
        self._receives[key] = (buffer, request)

    def receive(self, kind, microbatch, chunk=0):
        """Wait for a posted receive and return its buffer (valid until the step ends)."""
        buffer, request = self._receives.pop((kind, microbatch, chunk))
        request.Wait()
        return buffer

    def send(self, array, kind, microbatch, chunk, dest):
        """Send ``array`` to the receiving rank's piece ``chunk``."""
        array = np.ascontiguousarray(array)
        # Keep the array alive until the send completes.
        self._sends.append((array, self.comm.Isend(array, dest=dest,
                                                   tag=tag(kind, microbatch, chunk, self.chunks))))

    def finish(self):
        """Complete every send of the step (their buffers may then be reused)."""
        from mpi4py import MPI

        MPI.Request.Waitall([request for _, request in self._sends])
        self._sends.clear()
        if self._receives:
            raise RuntimeError(f"receives never consumed: {sorted(self._receives)}")
