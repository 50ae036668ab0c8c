"""Horovod for PyTorch, in one place: the import (or a stand-in for one process without
a Horovod build), its start-up, the trainer's collectives over it, and BatchNorm's
running statistics averaged over the replicas. Lines that differ from single-process
training are marked "# Horovod:"."""

import contextlib

import torch

from common.core.errors import UsageError
from common.launch.cpu_budget import cpus_per_rank
from common.launch.environment import launcher_world_size
from common.parallel.data_parallel import request_horovod_timeline
from train_torch.model import batch_norm_statistics


class OneProcess:
    """Horovod's calls for one process on a machine without a Horovod build (say, a
    CUDA PyTorch install): rank 0 of 1, every collective the identity."""

    Sum = Adasum = "sum"

    class Compression:
        none = fp16 = None

    def init(self):
        pass

    def rank(self):
        return 0

    local_rank = rank

    def size(self):
        return 1

    local_size = size

    def allreduce(self, tensor, **kwargs):
        return tensor

    allreduce_async = allreduce

    def synchronize(self, handle):
        return handle

    def broadcast_object(self, value, **kwargs):
        return value

    def allgather_object(self, value, **kwargs):
        return [value]

    def broadcast_parameters(self, *args, **kwargs):
        pass

    def start_timeline(self, path):
        pass  # no Horovod, no allreduce to trace

    def DistributedOptimizer(self, optimizer, **kwargs):  # noqa: N802 (Horovod's name)
        optimizer.synchronize, optimizer.skip_synchronize = (lambda: None), contextlib.nullcontext
        return optimizer


def average_batch_norm_statistics(hvd, model, process_set=None) -> None:
    """Horovod: replace each replica's BatchNorm running statistics by their mean over the
    replicas, before they are used (evaluation) or saved. Unsynchronised BatchNorm lets them
    drift apart; the mean is what one process would have tracked over the global batch, it
    is saved by rank 0 and evaluated by every rank alike, and since the running statistics
    are moving averages (linear), averaging now or later gives the same later means."""
    statistics = batch_norm_statistics(model)
    if not statistics:
        return
    kwargs = {"process_set": process_set} if process_set is not None else {}
    reduced = hvd.grouped_allreduce([statistic.detach() for statistic in statistics], op=hvd.Average,
                                    name="batch_norm_statistics", **kwargs)
    with torch.no_grad():
        for statistic, mean in zip(statistics, reduced):
            statistic.copy_(mean)


def import_horovod():
    """horovod.torch, or OneProcess for a single process where Horovod is not installed."""
    try:
        import horovod.torch as hvd
    except ImportError:
        if launcher_world_size() > 1:
            raise UsageError("Horovod is not installed (import horovod.torch failed) but the launcher started "
                             "several ranks; run `make install` (GPU=1 for NCCL) or train one process") from None
        return OneProcess()
    return hvd


def init_horovod(config):
    hvd = import_horovod()
    request_horovod_timeline(config)
    hvd.init()  # Horovod: one process per rank, started by horovodrun/mpirun/srun.
    threads = config.threads or cpus_per_rank(hvd.local_size())
    torch.set_num_threads(threads)  # Horovod: share the node's cores between its ranks.
    return hvd


class HorovodCollectives:
    """The trainer's collectives over Horovod (torch tensors)."""

    def __init__(self, hvd):
        self.hvd = hvd

    def allreduce_sums(self, sums, name):
        return self.hvd.allreduce(torch.from_numpy(sums), op=self.hvd.Sum, name=name).numpy()

    def broadcast_object(self, value, name):
        return self.hvd.broadcast_object(value, root_rank=0, name=name)

    def allgather_object(self, value, name):
        return self.hvd.allgather_object(value, name=name)

    def flag_sum(self, value):
        return self.start_flag_sum(value)()

    def start_flag_sum(self, value):
        """Horovod: start summing ``value`` over the ranks; the returned function
        waits for the sum. Started before a step, the allreduce travels with that
        step's gradients instead of adding a cycle."""
        handle = self.hvd.allreduce_async(torch.tensor([int(value)]), op=self.hvd.Sum, name="flag_sum")
        return lambda: int(self.hvd.synchronize(handle).item())
