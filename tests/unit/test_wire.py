"""Where tensors meet MPI (common/parallel/p2p.py's Wire, train_torch/wire.py, train_tf/wire.py):
every wire hands back what was sent, keeps a message's buffer from step to step, and
does not let a received buffer be overwritten before its contents have been taken."""

import numpy as np
import pytest

from common.core.errors import UsageError
from common.parallel import p2p

torch = pytest.importorskip("torch")
from train_torch import wire as torch_wire  # noqa: E402

CPU = torch.device("cpu")
WIRES = {"arrays": torch_wire.ArrayWire, "staged": lambda: torch_wire.StagedWire(CPU),
         "device": lambda: torch_wire.DeviceWire(CPU)}


@pytest.mark.parametrize("kind", sorted(WIRES))
def test_a_message_arrives_as_it_was_sent(kind):
    wire = WIRES[kind]()
    tensor = torch.randn(3, 4, 5, dtype=torch.float32)
    sent = wire.send_buffer((p2p.ACTIVATION, 0, 0, "out"), tensor)
    buffer = wire.receive_buffer((p2p.ACTIVATION, 0, 0), (3, 4, 5))
    np.asarray(buffer)[...] = np.asarray(sent)  # what MPI does between the ranks
    arrived = wire.arrived((p2p.ACTIVATION, 0, 0), buffer)
    assert isinstance(arrived, torch.Tensor) and torch.equal(arrived, tensor)


def test_a_bf16_output_travels_as_float32():
    sent = torch_wire.ArrayWire().send_buffer(("k",), torch.ones(2, 2, dtype=torch.bfloat16))
    assert sent.dtype == np.float32


def test_staged_buffers_are_kept_per_message_and_what_arrived_is_a_copy():
    wire = torch_wire.StagedWire(CPU)
    first = wire.receive_buffer((p2p.GRADIENT, 1, 0), (2, 3))
    first[...] = 7.0
    arrived = wire.arrived((p2p.GRADIENT, 1, 0), first)
    again = wire.receive_buffer((p2p.GRADIENT, 1, 0), (2, 3))
    assert again.ctypes.data == first.ctypes.data  # the same buffer next step
    again[...] = 0.0  # the next message lands: the tensor the stage holds keeps its values
    assert torch.equal(arrived, torch.full((2, 3), 7.0))
    assert wire.receive_buffer((p2p.GRADIENT, 2, 0), (2, 3)).ctypes.data != first.ctypes.data


def test_auto_on_a_cpu_hands_mpi_the_tensors_own_memory():
    wire = torch_wire.make_wire("auto", CPU)
    tensor = torch.arange(6, dtype=torch.float32)
    assert isinstance(wire, torch_wire.ArrayWire)
    assert wire.send_buffer(("k",), tensor).ctypes.data == tensor.data_ptr()
    assert isinstance(torch_wire.make_wire("host", CPU), torch_wire.StagedWire)
    assert isinstance(torch_wire.make_wire("device", CPU), torch_wire.DeviceWire)


def test_this_mpi_says_whether_it_takes_cuda_buffers():
    assert p2p.mpi_reports_cuda_support() in (True, False)


def test_tensorflow_stages_refuse_device_buffers_in_one_line():
    pytest.importorskip("tensorflow")
    from train_tf import wire as tf_wire

    with pytest.raises(UsageError, match="PyTorch"):
        tf_wire.make_wire("device")
    wire = tf_wire.make_wire("auto")
    import tensorflow as tf
    sent = wire.send_buffer(("k",), tf.ones([2, 3]))
    assert sent.dtype == np.float32 and sent.sum() == 6
