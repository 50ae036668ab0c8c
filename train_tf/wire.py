"""How TensorFlow tensors travel between ranks (common/parallel/p2p.py's Wire).

MPI reads and writes host arrays: a tensor leaves as its numpy copy (from a GPU,
TensorFlow's own device-to-host copy) and arrives as a host array that the next
compiled function copies to the device. CUDA tensors handed to MPI directly
(--p2p-memory device) are PyTorch's (train_torch/wire.py).
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from common.core.errors import UsageError
from common.parallel.p2p import NumpyWire


class TensorWire(NumpyWire):
    description = "host arrays (TensorFlow copies to and from its device)"

    def arrived(self, key: tuple, buffer):
        return tf.convert_to_tensor(buffer)

    def send_buffer(self, key: tuple, tensor):
        return np.ascontiguousarray(tensor.numpy() if hasattr(tensor, "numpy") else tensor, dtype=np.float32)


def make_wire(p2p_memory: str) -> TensorWire:
    if p2p_memory == "device":
        raise UsageError("--p2p-memory device hands CUDA tensors to MPI, which the PyTorch stages do; "
                         "TensorFlow's go through host memory: use --p2p-memory host or auto")
    return TensorWire()

