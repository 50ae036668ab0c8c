"""Data-parallel training with Horovod ring-allreduce (a common/core/runner.py Runner).

Lines that differ from single-process training are marked "# Horovod:".
Gradients are SUMMED across ranks (not averaged) and every rank divides its
summed per-sample losses by the size of the *global* batch, so the update is
exactly the full-batch mean gradient whatever the number of ranks and however
unevenly the last batch splits.
"""

import contextlib

import torch
import torch.nn.functional as F

from common.core.errors import UsageError
from common.data.batches import Reads
from common.launch.cpu_budget import cpus_per_rank
from common.launch.environment import launcher_world_size
from common.model import weights
from common.parallel.data_parallel import (
    apply_data_layout,
    primary_shard,
    read_on_primary,
    request_horovod_timeline,
    run_elastic,
    start_horovod_timeline,
)
from train_torch.checkpoint import load_neutral_state, load_optimizer_state, neutral_state, optimizer_slots
from train_torch.device import pick_device
from train_torch.input import DeviceMeter, make_feed
from train_torch.model import batch_norm_statistics, build_model, set_batch_norm_reduction
from train_torch.optimizer import make_local_optimizer
from train_torch.precision import LossScaler, autocast


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
            raise UsageError("Horovod is not installed (import horovod.torch failed) but the launcher "
                             "started several ranks; run `make install` (GPU=1 for NCCL) or train one process")
        return OneProcess()
    return hvd


def init_horovod(config):
    hvd = import_horovod()
    request_horovod_timeline(config)
    hvd.init()  # Horovod: one process per rank, started by horovodrun/mpirun/srun.
    threads = config.threads or cpus_per_rank(hvd.local_size())
    torch.set_num_threads(threads)  # Horovod: share the node's cores between its ranks.
    return hvd


def make_optimizer(model, config, hvd):
    # Horovod: allreduce gradients during backward; Sum because each rank already
    # divides by the global batch size (Adasum expects per-rank mean gradients).
    return hvd.DistributedOptimizer(
        make_local_optimizer(model, config), named_parameters=model.named_parameters(),
        compression=hvd.Compression.fp16 if config.fp16_allreduce else hvd.Compression.none,
        backward_passes_per_step=config.accumulation_steps,
        op=hvd.Adasum if config.adasum else hvd.Sum)


def backward_pass(runner, images, labels, scale, meter):
    """Forward + backward of one chunk, loss scaled so the ranks' gradients sum to the mean."""
    model = runner.model
    if len(labels) == 0:
        # An empty share (last batch smaller than the ranks) still has to join the
        # allreduce that every other rank is about to start; with --sync-bn also every
        # BatchNorm layer's, so it runs the empty batch through (its sums are 0).
        zero = model(images).sum() if runner.config.sync_bn else sum(p.sum() for p in model.parameters())
        (zero * 0.0).backward()
        return
    with autocast(runner.config, runner.device):
        logits = model(images)
        loss_sum = F.cross_entropy(logits.float(), labels, reduction="sum")
    target = loss_sum * scale
    (runner.scaler.scale(target) if runner.scaler else target).backward()
    meter.add(loss_sum, (logits.argmax(1) == labels).sum(), len(labels))


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


class DataParallelRunner:
    framework = "torch"
    checkpoint_shards = 1
    layout = ()
    reads = Reads(images=True, labels=True)  # every replica trains on its share of each batch

    def __init__(self, config, dataset, specs):
        self.hvd = init_horovod(config)
        apply_data_layout(self, self.hvd, config)
        self.collectives = HorovodCollectives(self.hvd)
        self.threads = torch.get_num_threads()
        self.config, self.dataset = config, dataset
        self.keys = weights.expected_keys(specs, dataset.image_shape)
        self.device = pick_device(self.hvd.local_rank())  # Horovod: one GPU per local rank
        self.feed = make_feed(config, self.device, dataset, self.reads)
        self.model = build_model(specs, dataset.image_shape, config.seed).to(self.device,
                                                                             memory_format=self.feed.memory_format)
        if config.sync_bn:  # Horovod: BatchNorm statistics of the global batch (autograd-aware sum)
            set_batch_norm_reduction(self.model, lambda sums: self.hvd.allreduce(sums, op=self.hvd.Sum))
        self.optimizer = make_optimizer(self.model, config, self.hvd)
        self.scaler = LossScaler(config, self.device, self.primary) if config.amp == "fp16" else None

    def start_timeline(self):
        start_horovod_timeline(self.hvd, self.config)

    def set_lr(self, value):
        for group in self.optimizer.param_groups:
            group["lr"] = value

    def train_step(self, batch, global_count):
        """One optimizer step on this rank's ``batch`` of a global batch of ``global_count``;
        its sums stay on the device until the trainer reads them."""
        self.model.train()
        batch = self.feed.arrive(batch)
        images, labels = self.feed.inputs(batch), self.feed.labels(batch)
        meter = DeviceMeter(self.device)
        self.optimizer.zero_grad()
        scale = 1.0 / max(1, batch.count) if self.config.adasum else 1.0 / global_count
        chunks = self.config.accumulation_steps
        for chunk_images, chunk_labels in zip(images.tensor_split(chunks), labels.tensor_split(chunks)):
            backward_pass(self, chunk_images, chunk_labels, scale, meter)
        if self.scaler:
            self.scaler.step(self.optimizer, self.optimizer.synchronize)  # Horovod: allreduce, then unscale
        else:
            self.optimizer.step()  # Horovod: waits for the allreduce of every gradient.
        return meter.pending()

    def share_batch_norm_statistics(self):
        if self.world_size > 1 and not self.config.sync_bn:  # --sync-bn keeps them equal already
            average_batch_norm_statistics(self.hvd, self.model)

    @torch.no_grad()
    def evaluate(self, batches):
        """Sums over this rank's slice of the test set (Horovod: each rank a slice)."""
        self.share_batch_norm_statistics()
        self.model.eval()
        meter = DeviceMeter(self.device)
        for batch in batches:
            batch = self.feed.arrive(batch)
            images, labels = self.feed.inputs(batch), self.feed.labels(batch)
            with autocast(self.config, self.device):
                logits = self.model(images).float()
            meter.add(F.cross_entropy(logits, labels, reduction="sum"), (logits.argmax(1) == labels).sum(),
                      len(labels))
        return meter.pending()

    def checkpoint_shard(self):
        self.share_batch_norm_statistics()
        return primary_shard(self.primary, lambda: neutral_state(self.model, self.optimizer))

    def load_state(self, open_checkpoint, with_optimizer):
        state = read_on_primary(self.primary, open_checkpoint, self.keys,
                                self.config.optimizer if with_optimizer else None)
        if state is not None:
            load_neutral_state(self.model, self.optimizer, state)
        # Horovod: every rank starts from rank 0's weights and optimizer state. The state
        # travels as arrays: hvd.broadcast_optimizer_state first takes a zero-gradient
        # step wherever the state is empty, which counts one Adam step too many and
        # applies weight decay once (the run would no longer equal one process's).
        self.hvd.broadcast_parameters(self.model.state_dict(), root_rank=0)
        slots = self.collectives.broadcast_object(
            optimizer_slots(self.model, self.optimizer) if self.primary else None, "optimizer_state")
        if not self.primary:
            load_optimizer_state(self.model, self.optimizer, slots)

    def run_elastic(self, start, train_from):
        """Horovod elastic (common/parallel/data_parallel.run_elastic) over Horovod's PyTorch state."""
        state = self.hvd.elastic.TorchState(self.model, self.optimizer, epoch=0, step=0, started=False)
        return run_elastic(self, self.hvd, state, start, train_from, self.hvd.elastic.run)
