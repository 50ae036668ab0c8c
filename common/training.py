"""The training driver shared by both frameworks and all modes.

It owns everything that is not framework arithmetic: the epoch loop, the
data order, the LR rule, progress bar, logs, metrics file, checkpoint cadence
and resume. A framework supplies a *runner* (train_torch/data_parallel.py,
train_tf/data_parallel.py) with this interface:

    framework, rank, world_size, threads       attributes
    primary                                    True on the one rank that logs and saves
    data_shards, data_shard                    data-parallel replicas and this rank's replica
    plan                                       the common/plan.py ParallelPlan
    set_lr(value)
    train_step(indices, global_count)          -> local (loss sum, correct, count)
    evaluate(x, y)                             -> local sums over this rank's slice
    allreduce_sums(sums, name)                 -> sums over all ranks
    broadcast_object(value, name)              -> the primary's value on every rank
    checkpoint_extension                       'pt' or 'tf'
    gather_state()                             collective; the whole model's state, on the primary
    save_checkpoint(path, epoch, architecture, state) -> None (primary only; path is temporary)
    load_checkpoint(path, architecture)        -> (epoch, state) (primary only; UsageError if unusable)
    load_weights(path, architecture)           -> state (primary only; any framework's checkpoint)
    install_state(state)                       collective; every rank takes its part of the
                                               primary's state (None: keep its own, synchronised)
"""

from tqdm import tqdm

from common import checkpoint, data, lr, metrics, models
from common.plan import check_batch
from common.errors import UsageError


def on_primary_for_all(runner, action, name):
    """Run ``action`` on the primary rank only and share whether it failed, so a
    UsageError raised there is raised on every rank and the job ends together."""
    result, problem = None, None
    if runner.primary:
        try:
            result = action()
        except UsageError as error:
            problem = str(error)
    problem = runner.broadcast_object(problem, name + "_problem")
    if problem:
        raise UsageError(problem)
    return result


def restore(runner, config, architecture):
    """Resume or initialise weights as the flags ask; returns the first epoch to run."""
    extension = runner.checkpoint_extension
    if config.checkpoint_dir:
        on_primary_for_all(runner, lambda: checkpoint.prepare_directory(
            config.checkpoint_dir, extension, config.resume), "checkpoint_dir")
    start_epoch, state = 0, None
    if config.resume:
        def load_latest():
            path = checkpoint.list_checkpoints(config.checkpoint_dir, extension)[-1][1]
            epoch, loaded = runner.load_checkpoint(path, architecture)
            metrics.log(f"resumed from {path} (epoch {epoch})")
            return epoch, loaded
        start_epoch, state = on_primary_for_all(runner, load_latest, "resume") or (None, None)
        start_epoch = runner.broadcast_object(start_epoch, "start_epoch")
    elif config.init_from:
        state = on_primary_for_all(runner, lambda: runner.load_weights(config.init_from, architecture),
                                   "init_from")
    runner.install_state(state)
    return start_epoch


def save(runner, config, epoch, architecture):
    state = runner.gather_state()  # collective: every stage hands its part to the primary
    if not runner.primary:
        return
    path = checkpoint.checkpoint_path(config.checkpoint_dir, epoch, runner.checkpoint_extension)
    checkpoint.atomic_save(path, lambda temporary: runner.save_checkpoint(temporary, epoch, architecture, state))
    checkpoint.prune(config.checkpoint_dir, runner.checkpoint_extension, config.keep_checkpoints)


def run(config, dataset, specs, runner):
    """Train and evaluate; returns (test loss, test accuracy)."""
    world, primary = runner.world_size, runner.primary
    check_batch(config, runner.plan)
    architecture = checkpoint.architecture(config.model, dataset.image_shape, dataset.num_classes)
    start_epoch = restore(runner, config, architecture)
    global_batch = config.global_batch_size(runner.data_shards)
    steps = data.steps_per_epoch(len(dataset.y_train), global_batch, config.steps_per_epoch)
    if primary:
        metrics.log(f"{runner.framework}: {config.model} ({models.total_params(specs, dataset.image_shape):,} "
                    f"params) on {dataset.name} {len(dataset.y_train)} train / {len(dataset.y_test)} test "
                    f"{'x'.join(map(str, dataset.image_shape))}; {describe(runner.plan, config)}, "
                    f"global batch {global_batch}, {steps} steps/epoch, {runner.threads} threads/rank")
        for line in getattr(runner, "layout", []):
            metrics.log(line)
    writer = metrics.JsonLinesWriter(config.metrics_file if primary else "")
    test = None
    for epoch in range(start_epoch, config.epochs):
        train = train_epoch(runner, dataset, config, epoch, steps)
        test = metrics.Meter.results(runner.allreduce_sums(runner.evaluate(dataset.x_test, dataset.y_test),
                                                           "eval_sums"))
        record = metrics.epoch_record(epoch + 1, train["results"], test, train["throughput"], world,
                                      config, runner.framework, train["seconds"], train["lr"])
        if primary:
            metrics.log(metrics.format_epoch(record, config.epochs))
            writer.write(record)
        if config.checkpoint_dir:
            save(runner, config, epoch + 1, architecture)
    if test is None:
        test = metrics.Meter.results(runner.allreduce_sums(runner.evaluate(dataset.x_test, dataset.y_test),
                                                           "eval_sums"))
    if primary:
        metrics.log(f"final test accuracy: {test[1]:.4f}  (test loss {test[0]:.4f})")
    return test


def describe(plan, config):
    if not plan.pipelined:
        return f"data parallel on {plan.world_size} rank(s)"
    return (f"{plan.mode} parallel: {plan.pp} stages x {plan.dp} replica(s), {config.microbatches} "
            f"micro-batches, {config.schedule}")


def train_epoch(runner, dataset, config, epoch, steps):
    world, shards = runner.world_size, runner.data_shards
    batches = data.rank_batches(len(dataset.y_train), config.global_batch_size(shards), shards,
                                runner.data_shard, config.seed, epoch, config.steps_per_epoch)
    meter, images, step_lr = metrics.Meter(), 0, config.lr
    progress = tqdm(batches, desc=f"epoch {epoch + 1}", leave=False, mininterval=0.5,
                    disable=not (config.progress and runner.primary))
    stopwatch = metrics.Stopwatch()
    for step, (indices, global_count) in enumerate(progress):
        step_lr = lr.lr_at(epoch * steps + step, steps, config, shards)
        runner.set_lr(step_lr)
        sums = runner.train_step(indices, global_count)
        meter.sums += sums
        images += global_count
        progress.set_postfix(loss=f"{sums[0] / max(1, sums[2]):.3f}", refresh=False)
    seconds = stopwatch.seconds()
    return {"results": metrics.Meter.results(runner.allreduce_sums(meter.sums, "train_sums")),
            "throughput": metrics.throughput(images, seconds, world), "seconds": seconds, "lr": step_lr}
