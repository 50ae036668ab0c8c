"""Horovod for TensorFlow, in one place: its start-up, the trainer's collectives over it,
and BatchNorm's running statistics averaged over the replicas. Lines that differ from
single-process training are marked "# Horovod:"."""

import tensorflow as tf

from common.launch.cpu_budget import cpus_per_rank
from common.parallel.data_parallel import request_horovod_timeline
from train_tf.device import pin_gpu
from train_tf.model import batch_norm_statistics


def init_horovod(config):
    import horovod.tensorflow as hvd

    request_horovod_timeline(config)
    hvd.init()  # Horovod: one process per rank, started by horovodrun/mpirun/srun.
    device = pin_gpu(hvd.local_rank())  # Horovod: one GPU per local rank, where there are GPUs
    threads = config.threads or cpus_per_rank(hvd.local_size())
    # Horovod: share the node's cores between its ranks (before TF runs any op).
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    return hvd, threads, device


class HorovodCollectives:
    """The trainer's collectives over Horovod (TF tensors). The per-step stop/NaN flag
    rides in the same fused allreduce as the step's gradients (the runner's
    _allreduce_gradients reads ``pending_flag`` and sets ``flag_total``)."""

    def __init__(self, hvd):
        self.hvd = hvd
        self.pending_flag = tf.zeros([1])
        self.flag_total = 0.0

    def allreduce_sums(self, sums, name):
        return self.hvd.allreduce(tf.constant(sums), op=self.hvd.Sum, name=name).numpy()

    def broadcast_object(self, value, name):
        return self.hvd.broadcast_object(value, root_rank=0, name=name)

    def allgather_object(self, value, name):
        return self.hvd.allgather_object(value, name=name)

    def flag_sum(self, value):
        """Horovod: the sum of ``value`` over the ranks (a sync point)."""
        return int(self.hvd.allreduce(tf.constant([float(value)]), op=self.hvd.Sum, name="flag_sum").numpy()[0])

    def start_flag_sum(self, value):
        """Like flag_sum, answered by the next train_step: the value travels in the
        same fused allreduce as that step's gradients instead of adding a cycle."""
        self.pending_flag = tf.constant([float(value)])
        return lambda: int(round(self.flag_total))


def average_batch_norm_statistics(hvd, model, process_set=None) -> None:
    """Horovod: each replica's BatchNorm running statistics replaced by their mean over the
    replicas (train_torch/data_parallel.py says why)."""
    statistics = batch_norm_statistics(model)
    if not statistics:
        return
    kwargs = {"process_set": process_set} if process_set is not None else {}
    reduced = hvd.grouped_allreduce([statistic.value for statistic in statistics], op=hvd.Average,
                                    name="batch_norm_statistics", **kwargs)
    for statistic, mean in zip(statistics, reduced):
        statistic.assign(mean)
