"""Point-to-point transport between pipeline stages: mpi4py over buffers a Wire provides.

Upper-case (buffer) Isend/Irecv only, so nothing is pickled on the hot path.
Shapes are never sent: both neighbours derive every message's shape from the
layer specs and the micro-batch sizes, which each computes from the same
sharding. All receives of a step are posted up front and sends never block,
so communication overlaps compute and no send/send cycle can deadlock.

What MPI reads and writes is the framework's business (its ``Wire``): numpy
arrays that are the tensors themselves on a CPU; on a GPU, page-locked host
buffers the tensors are copied through, or, with a CUDA-aware MPI, the CUDA
tensors themselves (train_torch/wire.py).
"""

from __future__ import annotations

import numpy as np

from common.core.runner import Wire

ACTIVATION, GRADIENT, EVALUATION = 0, 1, 2
EVALUATION_TAG = 1 << 20  # above every training tag; plus the receiving piece
BLANK_TAG = 1 << 21  # which samples of a batch the first stage left blank, for the last (--skip-bad-images)


def tag(kind: int, microbatch: int, chunk: int = 0, chunks: int = 1) -> int:
    """One tag per (message kind, micro-batch, receiving chunk); MPI keeps same-tag
    messages in order."""
    return 2 * (microbatch * chunks + chunk) + kind


class NumpyWire:
    """The wire of host arrays: what the stages take and return are numpy arrays already."""

    description = "host arrays"

    def __init__(self):
        self._buffers = {}

    def receive_buffer(self, key: tuple, shape: tuple):
        # Kept from step to step: a message's shape repeats every step, and fresh large
        # arrays cost page faults. A step's buffers are done with when the step ends.
        buffer = self._buffers.get(key)
        if buffer is None or buffer.shape != tuple(shape):
            buffer = self._buffers[key] = np.empty(shape, dtype=np.float32)
        return buffer

    def arrived(self, key: tuple, buffer):
        return buffer

    def send_buffer(self, key: tuple, tensor):
        return np.ascontiguousarray(tensor, dtype=np.float32)


class Transport:
    """``chunks``: model pieces per rank (--schedule interleaved), each with its own messages."""

    def __init__(self, comm, wire: Wire, chunks: int = 1):
        self.comm, self.wire, self.chunks = comm, wire, chunks
        self._sends: list = []  # MPI requests (and their buffers) of this step's sends
        self._receives: dict = {}  # message key -> (buffer, request)

    def post_receive(self, kind, microbatch, chunk, source, shape):
        key = (kind, microbatch, chunk)
        buffer = self.wire.receive_buffer(key, shape)
        request = self.comm.Irecv(buffer, source=source, tag=tag(kind, microbatch, chunk, self.chunks))
        self._receives[key] = (buffer, request)

    def receive(self, kind, microbatch, chunk=0):
        """Wait for a posted receive; its contents as the framework's tensor (valid until the step ends)."""
        buffer, request = self._receives.pop((kind, microbatch, chunk))
        request.Wait()
        return self.wire.arrived((kind, microbatch, chunk), buffer)

    def send(self, tensor, kind, microbatch, chunk, dest):
        """Send ``tensor`` to the receiving rank's piece ``chunk``."""
        buffer = self.wire.send_buffer((kind, microbatch, chunk, "out"), tensor)
        # Keep the buffer alive until the send completes.
        self._sends.append((buffer, self.comm.Isend(buffer, dest=dest,
                                                    tag=tag(kind, microbatch, chunk, self.chunks))))

    def send_now(self, tensor, dest, tag_):
        """A blocking send (evaluation's forward-only walk, one message at a time)."""
        self.comm.Send(self.wire.send_buffer((EVALUATION, tag_, "out"), tensor), dest=dest, tag=tag_)

    def receive_now(self, source, shape, tag_):
        buffer = self.wire.receive_buffer((EVALUATION, tag_), shape)
        self.comm.Recv(buffer, source=source, tag=tag_)
        return self.wire.arrived((EVALUATION, tag_), buffer)

    def finish(self):
        """Complete every send of the step (their buffers may then be reused)."""
        from mpi4py import MPI

        MPI.Request.Waitall([request for _, request in self._sends])
        self._sends.clear()
        if self._receives:
            raise RuntimeError(f"receives never consumed: {sorted(self._receives)}")


def mpi_reports_cuda_support() -> bool:
    """Whether the MPI library (already loaded by mpi4py) says it takes CUDA buffers:
    Open MPI's MPIX_Query_cuda_support (MPICH and MVAPICH have the same call)."""
    import ctypes
    import importlib

    importlib.import_module("mpi4py.MPI")  # loads the MPI library into the process

    try:
        query = ctypes.CDLL(None).MPIX_Query_cuda_support
    except (AttributeError, OSError):
        return False
    return bool(query())
