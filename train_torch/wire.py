"""How PyTorch tensors travel between ranks (common/parallel/p2p.py's Wire), on a CPU or a GPU.

- ``ArrayWire`` (a CPU device): MPI reads and writes the tensors' own memory as
  numpy arrays; nothing is copied.
- ``StagedWire`` (a GPU and an MPI that takes host memory only): each message has
  a page-locked host buffer, kept from step to step. A send copies the tensor into
  it (a DMA copy) and waits for that copy; a receive lands there and is copied to
  the device on the current stream, and the buffer is not handed to MPI again
  before that copy is done (its event).
- ``DeviceWire`` (a CUDA-aware MPI): MPI reads and writes CUDA tensors directly.
  A send first waits for the stream that computes the tensor; a receive gets a
  fresh device buffer once the stream is idle (MPI's own copies are not ordered
  with it).

``--p2p-memory host`` or ``device`` forces the latter two on a CPU too, where the
"device" is the CPU: the tests run their code paths that way (the staged copies
are then ordinary copies).
"""

from __future__ import annotations

import torch

from common.parallel.p2p import NumpyWire, mpi_reports_cuda_support


def _wait_for_stream(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


class ArrayWire(NumpyWire):
    description = "host arrays (the tensors' own memory)"

    def arrived(self, key: tuple, buffer):
        return torch.from_numpy(buffer)

    def send_buffer(self, key: tuple, tensor):
        return tensor.detach().to(torch.float32).contiguous().numpy()


class _Slot:
    def __init__(self, shape: tuple, pinned: bool):
        self.tensor = torch.empty(shape, dtype=torch.float32, pin_memory=pinned)
        self.copied: torch.cuda.Event | None = None  # the last copy out of it, still to finish


class StagedWire:
    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.description = "page-locked host buffers" if self.cuda else "host buffers of their own"
        self._slots: dict = {}

    def _slot(self, key: tuple, shape: tuple) -> _Slot:
        slot = self._slots.get(key)
        if slot is None or tuple(slot.tensor.shape) != tuple(shape):
            slot = self._slots[key] = _Slot(tuple(shape), pinned=self.cuda)
        return slot

    def receive_buffer(self, key: tuple, shape: tuple):
        slot = self._slot(key, shape)
        if slot.copied is not None:
            slot.copied.synchronize()  # last step's copy to the device has read it
            slot.copied = None
        return slot.tensor.numpy()

    def arrived(self, key: tuple, buffer):
        slot = self._slots[key]
        if not self.cuda:
            return slot.tensor.clone()
        tensor = slot.tensor.to(self.device, non_blocking=True)
        slot.copied = torch.cuda.Event()
        slot.copied.record(torch.cuda.current_stream(self.device))
        return tensor

    def send_buffer(self, key: tuple, tensor):
        slot = self._slot(key, tuple(tensor.shape))
        slot.tensor.copy_(tensor.detach(), non_blocking=self.cuda)
        _wait_for_stream(self.device)  # the copy (and what made the tensor) is done before MPI reads
        return slot.tensor.numpy()


class DeviceWire:
    description = "the tensors themselves (for a CUDA-aware MPI)"

    def __init__(self, device: torch.device):
        self.device = device

    def receive_buffer(self, key: tuple, shape: tuple):
        _wait_for_stream(self.device)
        return torch.empty(shape, dtype=torch.float32, device=self.device)

    def arrived(self, key: tuple, buffer):
        return buffer

    def send_buffer(self, key: tuple, tensor):
        _wait_for_stream(self.device)
        return tensor.detach().to(torch.float32).contiguous()


def make_wire(p2p_memory: str, device: torch.device):
    """The wire --p2p-memory asks for on ``device`` (auto: the CUDA tensors themselves when
    the MPI says it takes them, page-locked host buffers otherwise; on a CPU, the arrays)."""
    if p2p_memory == "auto":
        if device.type != "cuda":
            return ArrayWire()
        p2p_memory = "device" if mpi_reports_cuda_support() else "host"
    return DeviceWire(device) if p2p_memory == "device" else StagedWire(device)

