"""Data-parallel training with Horovod ring-allreduce (a common/core/runner.py Runner).

Lines that differ from single-process training are marked "# Horovod:".
Gradients are SUMMED across ranks (not averaged) and every rank divides its
summed per-sample losses by the size of the *global* batch, so the update is
exactly the full-batch mean gradient whatever the number of ranks and however
unevenly the last batch splits.
"""


import torch
import torch.nn.functional as F

from common.core.config import Amp
from common.core.metrics import IGNORED_LABEL
from common.model import networks, weights
from common.parallel.data_parallel import ReplicaRunner, apply_data_layout, run_elastic
from train_torch.checkpoint import load_neutral_state, load_optimizer_state, neutral_state, optimizer_slots
from train_torch.device import memory_meter, pick_device
from train_torch.horovod_glue import HorovodCollectives, average_batch_norm_statistics, init_horovod
from train_torch.input import DeviceMeter, make_feed
from train_torch.model import build_model, dropout_keys, set_batch_norm_reduction
from train_torch.optimizer import make_local_optimizer
from train_torch.precision import LossScaler, autocast


def make_optimizer(model, config, hvd):
    # Horovod: allreduce gradients during backward; Sum because each rank already
    # divides by the global batch size (Adasum expects per-rank mean gradients).
    return hvd.DistributedOptimizer(
        make_local_optimizer(model, config), named_parameters=model.named_parameters(),
        compression=hvd.Compression.fp16 if config.fp16_allreduce else hvd.Compression.none,
        backward_passes_per_step=config.accumulation_steps,
        op=hvd.Adasum if config.adasum else hvd.Sum)


def backward_pass(runner, images, labels, keys, scored, scale, meter):
    """Forward + backward of one chunk, loss scaled so the ranks' gradients sum to the mean;
    ``keys``: the chunk's dropout keys (None when the model does not drop); ``scored``: its
    samples that count (blank ones carry IGNORED_LABEL, which cross_entropy leaves out)."""
    model = runner.model
    if len(labels) == 0:
        # An empty share (last batch smaller than the ranks) still has to join the
        # allreduce that every other rank is about to start; with --sync-bn also every
        # BatchNorm layer's, so it runs the empty batch through (its sums are 0).
        zero = model(images).sum() if runner.config.sync_bn else sum(p.sum() for p in model.parameters())
        (zero * 0.0).backward()
        return
    with autocast(runner.config, runner.device):
        logits = model(images, keys)
        loss_sum = F.cross_entropy(logits.float(), labels, reduction="sum", ignore_index=IGNORED_LABEL)
    target = loss_sum * scale
    (runner.scaler.scale(target) if runner.scaler else target).backward()
    meter.add(loss_sum, (logits.argmax(1) == labels).sum(), scored)


class DataParallelRunner(ReplicaRunner):
    framework = "torch"

    def __init__(self, config, dataset, specs):
        self.hvd = init_horovod(config)
        apply_data_layout(self, self.hvd, config)
        self.collectives = HorovodCollectives(self.hvd)
        self.threads = torch.get_num_threads()
        self.config, self.dataset = config, dataset
        self.keys = weights.expected_keys(specs, dataset.image_shape)
        self.ranges = [(0, len(specs))]  # one piece: the whole model
        self.device = pick_device(self.hvd.local_rank())  # Horovod: one GPU per local rank
        self.memory = memory_meter(self.device)  # before the model
        self.feed = make_feed(config, self.device, dataset, self.reads)
        self.model = build_model(specs, dataset.image_shape, config.seed).to(self.device,
                                                                             memory_format=self.feed.memory_format)
        self.model.recompute = config.recompute
        if config.sync_bn:  # Horovod: BatchNorm statistics of the global batch (autograd-aware sum)
            set_batch_norm_reduction(self.model, lambda sums: self.hvd.allreduce(sums, op=self.hvd.Sum))
        self.drops = networks.drops(specs)  # then each step hands the model its samples' keys
        self.optimizer = make_optimizer(self.model, config, self.hvd)
        self.scaler = LossScaler(config, self.device, self.primary) if config.amp == Amp.FP16 else None

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
        keys = (dropout_keys(self.config.seed, batch, self.device).tensor_split(chunks) if self.drops
                else [None] * chunks)
        # (tensor_split cuts as Batch.parts does: np.array_split's sizes)
        for chunk_images, chunk_labels, chunk_keys, part in zip(images.tensor_split(chunks),
                                                                labels.tensor_split(chunks), keys, batch.parts(chunks)):
            backward_pass(self, chunk_images, chunk_labels, chunk_keys, part.scored, scale, meter)
        if self.scaler:
            self.scaler.step(self.optimizer, self.optimizer.synchronize)  # Horovod: allreduce, then unscale
        else:
            self.optimizer.step()  # Horovod: waits for the allreduce of every gradient.
        return meter.pending()

    def average_batch_norm_statistics(self):
        average_batch_norm_statistics(self.hvd, self.model)

    @torch.no_grad()
    def evaluate_slice(self, batches):
        self.model.eval()
        meter = DeviceMeter(self.device)
        for batch in batches:
            batch = self.feed.arrive(batch)
            images, labels = self.feed.inputs(batch), self.feed.labels(batch)
            with autocast(self.config, self.device):
                logits = self.model(images).float()
            loss_sum = F.cross_entropy(logits, labels, reduction="sum", ignore_index=IGNORED_LABEL)
            meter.add(loss_sum, (logits.argmax(1) == labels).sum(), batch.scored)
        return meter.pending()

    def loss_scale(self):
        return self.scaler.state() if self.scaler else None

    def restore_loss_scale(self, state):
        if self.scaler:
            self.scaler.restore(state)

    def neutral_state(self):
        return neutral_state(self.model, self.optimizer)

    def load_neutral_state(self, state):
        load_neutral_state(self.model, self.optimizer, state)

    def broadcast_from_primary(self):
        # Horovod: every rank starts from rank 0's weights and optimizer state. The state
        # travels as arrays: hvd.broadcast_optimizer_state first takes a zero-gradient
        # step wherever the state is empty, which counts one Adam step too many and
        # applies weight decay once (the run would no longer equal one process's).
        self.hvd.broadcast_parameters(self.model.state_dict(), root_rank=0)
        self.broadcast_optimizer_slots()

    def broadcast_optimizer_slots(self):
        slots = self.collectives.broadcast_object(
            optimizer_slots(self.model, self.optimizer) if self.primary else None, "optimizer_state")
        if not self.primary:
            load_optimizer_state(self.model, self.optimizer, slots)

    def run_elastic(self, start, train_from):
        """Horovod elastic (common/parallel/data_parallel.run_elastic) over Horovod's PyTorch state,
        whose optimizer handler syncs the state as arrays too (see broadcast_from_primary): its own
        sync, at every (re)start of the elastic loop, would take that extra zero-gradient step."""
        from horovod.torch.elastic.state import OptimizerStateHandler

        class OptimizerSlotsHandler(OptimizerStateHandler):
            def sync(handler):
                self.broadcast_optimizer_slots()

        state = self.hvd.elastic.TorchState(self.model, self.optimizer, epoch=0, step=0, started=False)
        state._handlers["optimizer"] = OptimizerSlotsHandler(self.optimizer)  # Horovod keeps no public hook
        return run_elastic(self, self.hvd, state, start, train_from, self.hvd.elastic.run)
