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
    flag_sum(value)                            collective; the sum of ``value`` over the ranks
    start_flag_sum(value)                      the same, answered by a function called after the
                                               next train_step (so it can travel with that step)
    gather_state()                             collective; the whole model's state, on the primary
    save_checkpoint(path, position, architecture, state) -> None (primary only; path is temporary)
    load_checkpoint(path, architecture)        -> (position, state) (primary only; UsageError if unusable)
                                               position = (completed epochs, steps into the next)
    load_weights(path, architecture)           -> state (primary only; any framework's checkpoint)
    install_state(state)                       collective; every rank takes its part of the
                                               primary's state (None: keep its own, synchronised)
    run_elastic(start, train_from)             --elastic only (PyTorch data mode): the first
                                               workers call start() (collective: resume/init ->
                                               position), then train_from(position, commit), again
                                               from the last commit whenever workers leave or join
"""

import math
import os
import signal

from tqdm import tqdm

from common import checkpoint, data, lr, metrics, models
from common.config import parse_config
from common.plan import check_batch, check_stages
from common.errors import RunStopped, UsageError
from common.launch import apply_tuned_defaults, injected_failure


def load_run(argv, prog, elastic_supported=False):
    """What both entry scripts do before any framework import: the flags, the
    data and the model's layer specs, each checked (UsageError on bad input)."""
    config = parse_config(argv, prog=prog)
    apply_tuned_defaults()  # read when MPI starts, which is later (in the runner)
    if config.elastic and not elastic_supported:
        raise UsageError(f"--elastic uses Horovod's PyTorch elastic API: run train_torch/main.py "
                         f"({prog} trains on a fixed set of ranks; drop --elastic)")
    dataset = data.load_dataset(config)
    specs = models.model_specs(config.model, dataset.image_shape, dataset.num_classes)
    check_stages(config, specs)
    return config, dataset, specs


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
    """Resume or initialise weights as the flags ask; returns where to start: (epoch, step)."""
    extension = runner.checkpoint_extension
    if config.checkpoint_dir:
        on_primary_for_all(runner, lambda: checkpoint.prepare_directory(
            config.checkpoint_dir, extension, config.resume), "checkpoint_dir")
    start, state = (0, 0), None
    if config.resume:
        def load_latest():
            return load_newest_valid(runner, config.checkpoint_dir, architecture)
        start, state = on_primary_for_all(runner, load_latest, "resume") or (None, None)
        start = tuple(runner.broadcast_object(start, "start"))
    elif config.init_from:
        state = on_primary_for_all(runner, lambda: runner.load_weights(config.init_from, architecture),
                                   "init_from")
    runner.install_state(state)
    return start


def load_newest_valid(runner, directory, architecture):
    """The newest checkpoint that loads, saying which; older ones only if newer fail."""
    problems = []
    for _, path in reversed(checkpoint.list_checkpoints(directory, runner.checkpoint_extension)):
        try:
            position, loaded = runner.load_checkpoint(path, architecture)
        except UsageError as error:
            if "holds model" in str(error):
                raise  # the wrong architecture is the user's mistake, not a damaged file
            problems.append(str(error))
            metrics.log(f"skipping {path}: it does not load")
            continue
        epoch, step = position
        where = f"{step} steps into epoch {epoch + 1}" if step else f"after epoch {epoch}"
        metrics.log(f"resumed from {path} ({where})")
        return position, loaded
    raise UsageError(problems[0] if len(problems) == 1 else
                     f"no checkpoint in {directory} loads ({len(problems)} tried; newest: {problems[0]})")


def save(runner, config, position, architecture):
    """Checkpoint at ``position`` = (completed epochs, steps into the next); collective."""
    state = runner.gather_state()  # every stage hands its part to the primary
    if not runner.primary:
        return None
    path = checkpoint.checkpoint_path(config.checkpoint_dir, position, runner.checkpoint_extension)
    checkpoint.atomic_save(path, lambda temporary: runner.save_checkpoint(temporary, position, architecture, state),
                           before_rename=lambda: injected_failure(runner.rank, "save"))
    checkpoint.prune(config.checkpoint_dir, runner.checkpoint_extension, config.keep_checkpoints)
    return path


class StopRequest:
    """SIGUSR1/SIGTERM ask for a graceful stop: the ranks agree at the next step
    boundary, save a checkpoint and exit 0 (Slurm sends these before preemption
    or the time limit). A second signal ends the process at once."""

    SIGNALS = ("SIGUSR1", "SIGTERM")

    def __init__(self):
        self.signal_name = None
        for name in self.SIGNALS:
            signal.signal(getattr(signal, name), self._handle)

    def _handle(self, number, frame):
        if self.signal_name is not None:
            os._exit(128 + number)
        self.signal_name = signal.Signals(number).name

    @property
    def requested(self):
        return self.signal_name is not None


class Health:
    """What each rank tells the others at every step boundary, as one number to
    sum: 1 if it was asked to stop, world_size + 1 if it saw a non-finite loss
    (so any such rank makes the sum exceed world_size)."""

    def __init__(self, stop, runner, allow_nonfinite):
        self.stop, self.runner, self.allow_nonfinite = stop, runner, allow_nonfinite
        self.nonfinite_at = None

    @property
    def world_size(self):
        return self.runner.world_size  # read each time: elastic training changes it

    def check_loss(self, sums, epoch, step):
        if not self.allow_nonfinite and self.nonfinite_at is None and not math.isfinite(sums[0]):
            self.nonfinite_at = (epoch, step)

    def code(self):
        return (self.world_size + 1 if self.nonfinite_at else 0) + (1 if self.stop.requested else 0)

    def verdict(self, total, epoch, step):
        """'stop' or None from the summed codes; raises RunStopped on a non-finite loss."""
        if total > self.world_size:
            where = (f"epoch {self.nonfinite_at[0] + 1}, step {self.nonfinite_at[1] + 1}" if self.nonfinite_at
                     else f"epoch {epoch + 1}, step {step + 1} (seen on another rank)")
            raise RunStopped(f"the loss became NaN or infinite at {where}; stopped without saving, so the "
                             "newest checkpoint is the last good one. Lower --lr (or pass --allow-nonfinite)")
        return "stop" if total > 0 else None


def run(config, dataset, specs, runner):
    """Train and evaluate; returns (test loss, test accuracy)."""
    check_batch(config, runner.plan)
    architecture = checkpoint.architecture(config.model, dataset.image_shape, dataset.num_classes)
    stop = StopRequest()
    global_batch = config.global_batch_size(runner.data_shards)
    steps = data.steps_per_epoch(len(dataset.y_train), global_batch, config.steps_per_epoch)
    if runner.primary:
        metrics.log(f"{runner.framework}: {config.model} ({models.total_params(specs, dataset.image_shape):,} "
                    f"params) on {dataset.name} {len(dataset.y_train)} train / {len(dataset.y_test)} test "
                    f"{'x'.join(map(str, dataset.image_shape))}; {describe(runner.plan, config)}, "
                    f"global batch {global_batch}, {steps} steps/epoch, {runner.threads} threads/rank")
        for line in getattr(runner, "layout", []):
            metrics.log(line)
    writer = metrics.JsonLinesWriter(config.metrics_file if runner.primary else "")

    def train_from(position, commit=None):
        return train_epochs(runner, config, dataset, position, steps, architecture, stop, writer, commit)

    def start():
        return restore(runner, config, architecture)

    if config.elastic:
        return runner.run_elastic(start, train_from)
    return train_from(start())


def train_epochs(runner, config, dataset, start, steps, architecture, stop, writer, commit=None):
    """Epochs from ``start`` = (epoch, step) to the end; returns the test (loss, accuracy),
    or None when stopped early. ``commit(epoch, step)``, if given, is told each position
    reached (elastic training keeps its recoverable state with it)."""
    start_epoch, start_step = start
    health = Health(stop, runner, config.allow_nonfinite)
    test = None
    for epoch in range(start_epoch, config.epochs):
        train = train_epoch(runner, dataset, config, epoch, steps, start_step if epoch == start_epoch else 0,
                            health, commit)
        if train["stopped_after"] is not None:
            return stop_now(runner, config, (epoch, train["stopped_after"]), architecture, stop)
        # Before saving: never let a non-finite last step overwrite a good checkpoint.
        stopping = health.verdict(runner.flag_sum(health.code()), epoch, steps - 1) == "stop"
        test = evaluate(runner, dataset)
        record = metrics.epoch_record(epoch + 1, train["results"], test, train["throughput"], runner.world_size,
                                      config, runner.framework, train["seconds"], train["lr"])
        if runner.primary:
            metrics.log(metrics.format_epoch(record, config.epochs))
            writer.write(record)
        path = save(runner, config, (epoch + 1, 0), architecture) if config.checkpoint_dir else None
        if commit:
            commit(epoch + 1, 0)
        if stopping and epoch + 1 < config.epochs:
            return report_stop(runner, stop, (epoch + 1, 0), path)
    if test is None:
        test = evaluate(runner, dataset)
    if runner.primary:
        metrics.log(f"final test accuracy: {test[1]:.4f}  (test loss {test[0]:.4f})")
    return test


def evaluate(runner, dataset):
    return metrics.Meter.results(runner.allreduce_sums(runner.evaluate(dataset.x_test, dataset.y_test),
                                                       "eval_sums"))


def stop_now(runner, config, position, architecture, stop):
    """Every rank agreed to stop after ``position``: save it and report."""
    path = save(runner, config, position, architecture) if config.checkpoint_dir else None
    return report_stop(runner, stop, position, path)


def report_stop(runner, stop, position, path):
    if runner.primary:
        epoch, step = position
        where = f"after {step} steps of epoch {epoch + 1}" if step else f"after epoch {epoch}"
        cause = stop.signal_name or "a signal to another rank"
        saved = f"saved {path}; continue with --resume" if path else "nothing saved (no --checkpoint-dir)"
        metrics.log(f"stopped by {cause} {where}; {saved}")
    return None


def describe(plan, config):
    if plan.mode == "ps":
        return f"parameter server: rank 0 serves {plan.dp} worker(s)"
    if not plan.pipelined:
        return f"data parallel on {plan.world_size} rank(s)"
    return (f"{plan.mode} parallel: {plan.pp} stages x {plan.dp} replica(s), {config.microbatches} "
            f"micro-batches, {config.schedule}")


def train_epoch(runner, dataset, config, epoch, steps, first_step, health, commit=None):
    """Steps first_step.. of ``epoch``; stops early, every rank together, on a stop
    request (returning where) or a non-finite loss (raising RunStopped)."""
    world, shards = runner.world_size, runner.data_shards
    batches = data.rank_batches(len(dataset.y_train), config.global_batch_size(shards), shards,
                                runner.data_shard, config.seed, epoch, config.steps_per_epoch)
    meter, images, step_lr, stopped_after = metrics.Meter(), 0, config.lr, None
    progress = tqdm(batches[first_step:], desc=f"epoch {epoch + 1}", leave=False, mininterval=0.5,
                    disable=not (config.progress and runner.primary))
    stopwatch = metrics.Stopwatch()
    for step, (indices, global_count) in enumerate(progress, start=first_step):
        step_lr = lr.lr_at(epoch * steps + step, steps, config, shards)
        runner.set_lr(step_lr)
        # A sync point: a signal or a non-finite loss may have reached only some ranks.
        agreed = runner.start_flag_sum(health.code())
        injected_failure(runner.rank, epoch * steps + step)
        sums = runner.train_step(indices, global_count)
        health.check_loss(sums, epoch, step)
        meter.sums += sums
        images += global_count
        progress.set_postfix(loss=f"{sums[0] / max(1, sums[2]):.3f}", refresh=False)
        if health.verdict(agreed(), epoch, step) == "stop" and step + 1 < len(batches):
            stopped_after = step + 1
            break
        if commit and step + 1 < len(batches):
            commit(epoch, step + 1)
    progress.close()
    seconds = stopwatch.seconds()
    return {"results": metrics.Meter.results(runner.allreduce_sums(meter.sums, "train_sums")),
            "throughput": metrics.throughput(images, seconds, world), "seconds": seconds, "lr": step_lr,
            "stopped_after": stopped_after}
