"""Data-parallel training with Horovod ring-allreduce.

Lines that differ from single-process training are marked "# Horovod:".
Gradients are SUMMED across ranks (not averaged) and every rank divides its
summed per-sample losses by the size of the *global* batch, so the update is
exactly the full-batch mean gradient whatever the number of ranks and however
unevenly the last batch splits.
"""

import os

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from common import checkpoint as common_checkpoint
from common import data, lr, metrics, models
from common.config import check_world_size
from common.errors import UsageError
from train_torch import checkpoint
from train_torch.model import build_model

FRAMEWORK = "pytorch"


def init_horovod(config):
    import horovod.torch as hvd

    hvd.init()  # Horovod: one process per rank, started by horovodrun/mpirun/srun.
    threads = config.threads or max(1, (os.cpu_count() or 1) // hvd.local_size())
    torch.set_num_threads(threads)  # Horovod: share the node's cores between its ranks.
    return hvd


def make_optimizer(model, config, hvd):
    if config.optimizer == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                    weight_decay=config.weight_decay)
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    # Horovod: allreduce gradients during backward; Sum because each rank already
    # divides by the global batch size (Adasum expects per-rank mean gradients).
    return hvd.DistributedOptimizer(
        optimizer, named_parameters=model.named_parameters(),
        compression=hvd.Compression.fp16 if config.fp16_allreduce else hvd.Compression.none,
        backward_passes_per_step=config.accumulation_steps,
        op=hvd.Adasum if config.adasum else hvd.Sum)


def set_lr(optimizer, value):
    for group in optimizer.param_groups:
        group["lr"] = value


def backward_pass(model, images, labels, scale, meter):
    """Forward + backward of one chunk, loss scaled so the ranks' gradients sum to the mean."""
    if len(labels) == 0:
        # An empty share (last batch smaller than the ranks) still has to join
        # the allreduce that every other rank is about to start.
        (sum(parameter.sum() for parameter in model.parameters()) * 0.0).backward()
        return
    logits = model(images)
    loss_sum = F.cross_entropy(logits, labels, reduction="sum")
    (loss_sum * scale).backward()
    meter.add(loss_sum.item(), (logits.argmax(1) == labels).sum().item(), len(labels))


def train_step(model, optimizer, x, y, indices, global_count, config):
    """One optimizer step on this rank's ``indices`` of a global batch of ``global_count``."""
    meter = metrics.Meter()
    optimizer.zero_grad()
    scale = 1.0 / max(1, len(indices)) if config.adasum else 1.0 / global_count
    for chunk in np.array_split(indices, config.accumulation_steps):
        backward_pass(model, torch.from_numpy(x[chunk]), torch.from_numpy(y[chunk]), scale, meter)
    optimizer.step()  # Horovod: waits for the allreduce of every gradient.
    return meter


def allreduce_sums(sums, hvd, name):
    """Horovod: add up (loss, correct, count) over all ranks."""
    return hvd.allreduce(torch.from_numpy(sums), op=hvd.Sum, name=name).numpy()


@torch.no_grad()
def evaluate(model, x, y, hvd, batch_size=512):
    model.eval()
    meter = metrics.Meter()
    shard = data.eval_shard(len(y), hvd.size(), hvd.rank())  # Horovod: each rank a slice.
    for indices in data.batched(shard, batch_size):
        images, labels = torch.from_numpy(x[indices]), torch.from_numpy(y[indices])
        logits = model(images)
        meter.add(F.cross_entropy(logits, labels, reduction="sum").item(),
                  (logits.argmax(1) == labels).sum().item(), len(labels))
    return metrics.Meter.results(allreduce_sums(meter.sums, hvd, "eval_sums"))


def resume_state(config, architecture, hvd):
    """Rank 0 loads the newest checkpoint; every rank learns the outcome, so all fail alike."""
    state, problem = None, None
    if hvd.rank() == 0:
        try:
            state = checkpoint.load(checkpoint.latest(config.checkpoint_dir), architecture)
        except UsageError as error:
            problem = str(error)
    problem = hvd.broadcast_object(problem, root_rank=0, name="resume_problem")
    if problem:
        raise UsageError(problem)
    return state


def prepare_checkpoints(config, hvd):
    """Rank 0 checks the directory; the verdict is shared so every rank stops together."""
    problem = None
    if hvd.rank() == 0:
        try:
            common_checkpoint.prepare_directory(config.checkpoint_dir, checkpoint.EXTENSION, config.resume)
        except UsageError as error:
            problem = str(error)
    problem = hvd.broadcast_object(problem, root_rank=0, name="checkpoint_dir_problem")
    if problem:
        raise UsageError(problem)


def train(config):
    dataset = data.load_dataset(config)
    specs = models.model_specs(config.model, dataset.image_shape, dataset.num_classes)
    hvd = init_horovod(config)
    world, primary = hvd.size(), hvd.rank() == 0  # Horovod: rank 0 alone logs and saves.
    check_world_size(config, world)
    if config.checkpoint_dir:
        prepare_checkpoints(config, hvd)

    model = build_model(specs, dataset.image_shape, config.seed)
    optimizer = make_optimizer(model, config, hvd)
    architecture = common_checkpoint.architecture(config.model, dataset.image_shape, dataset.num_classes)
    start_epoch = 0
    if config.resume:
        state = resume_state(config, architecture, hvd)
        if primary:
            checkpoint.restore(state, model, optimizer)
            metrics.log(f"resumed from {checkpoint.latest(config.checkpoint_dir)} (epoch {state['epoch']})")
        start_epoch = hvd.broadcast_object(state["epoch"] if primary else None, root_rank=0,
                                           name="start_epoch")
    # Horovod: every rank starts from rank 0's weights and optimizer state.
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(optimizer, root_rank=0)

    global_batch = config.global_batch_size(world)
    steps = data.steps_per_epoch(len(dataset.y_train), global_batch, config.steps_per_epoch)
    if primary:
        metrics.log(f"{FRAMEWORK}: {config.model} ({models.total_params(specs, dataset.image_shape):,} params) "
              f"on {dataset.name} {len(dataset.y_train)} train / {len(dataset.y_test)} test "
              f"{'x'.join(map(str, dataset.image_shape))}; data parallel on {world} rank(s), "
              f"global batch {global_batch}, {steps} steps/epoch, {torch.get_num_threads()} threads/rank")

    writer = metrics.JsonLinesWriter(config.metrics_file if primary else "")
    test = None
    for epoch in range(start_epoch, config.epochs):
        record = train_epoch(model, optimizer, dataset, config, hvd, epoch, steps)
        test = evaluate(model, dataset.x_test, dataset.y_test, hvd)
        record = metrics.epoch_record(epoch + 1, record["train"], test, record["throughput"], world,
                                      config, FRAMEWORK, record["seconds"], record["lr"])
        if primary:
            metrics.log(metrics.format_epoch(record, config.epochs))
            writer.write(record)
            if config.checkpoint_dir:
                checkpoint.save(config.checkpoint_dir, epoch + 1, model, optimizer, config,
                                architecture, config.keep_checkpoints)
    if test is None:
        test = evaluate(model, dataset.x_test, dataset.y_test, hvd)
    if primary:
        metrics.log(f"final test accuracy: {test[1]:.4f}  (test loss {test[0]:.4f})")
    return test


def train_epoch(model, optimizer, dataset, config, hvd, epoch, steps):
    model.train()
    world = hvd.size()
    batches = data.rank_batches(len(dataset.y_train), config.global_batch_size(world), world,
                                hvd.rank(), config.seed, epoch, config.steps_per_epoch)
    meter, images = metrics.Meter(), 0
    progress = tqdm(batches, desc=f"epoch {epoch + 1}", leave=False, mininterval=0.5,
                    disable=not (config.progress and hvd.rank() == 0))
    stopwatch = metrics.Stopwatch()
    for step, (indices, global_count) in enumerate(progress):
        step_lr = lr.lr_at(epoch * steps + step, steps, config, world)
        set_lr(optimizer, step_lr)
        step_meter = train_step(model, optimizer, dataset.x_train, dataset.y_train, indices,
                                global_count, config)
        meter.sums += step_meter.sums
        images += global_count
        progress.set_postfix(loss=f"{step_meter.sums[0] / max(1, step_meter.sums[2]):.3f}", refresh=False)
    seconds = stopwatch.seconds()
    return {"train": metrics.Meter.results(allreduce_sums(meter.sums, hvd, "train_sums")),
            "throughput": metrics.throughput(images, seconds, world), "seconds": seconds, "lr": step_lr}
