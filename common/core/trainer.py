"""The training loop shared by both frameworks and every mode.

The Trainer owns everything that is not framework arithmetic or parallel
layout: the epoch and step loop, the data order, the LR rule, the stop/NaN
agreement between ranks, progress, logs, the metrics file, checkpoints and
resume. A Runner (common/core/runner.py) does one rank's part of each step.
"""

from __future__ import annotations

import functools
import math
import os
import signal
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import numpy as np

from common.core import lr, metrics, summary
from common.core.config import Amp, DatasetName, Mode, RunConfig, as_toml, parse_config
from common.core.errors import RankUsageError, RunStopped, UsageError
from common.core.progress import ProgressBar
from common.core.runner import ElasticRunner, Runner
from common.core.summary import ElasticRestart, MembershipChange, Outcome, Resumed, RunSummary, Stop
from common.data import datasets
from common.data.batches import Batch, BatchReader, BlankCount, Prefetcher
from common.launch import hardware
from common.launch.cpu_budget import read_cpu_share
from common.launch.environment import apply_tuned_defaults
from common.launch.faults import FaultInjection
from common.launch.placement import host_placement
from common.launch.supervision import ContactDeadline, Supervision
from common.model import checkpoint, networks, weights
from common.model.checkpoint import Position
from common.model.loss_scale import DynamicLossScale
from common.observe import run_dir
from common.parallel import memory_model
from common.parallel.plan import check_batch, check_stages

if TYPE_CHECKING:
    from common.observe.tensorboard import TensorBoardLog


@dataclass(frozen=True)
class LoadedRun:
    """What an entry script has before any framework import: the checked settings, the
    data, the model's layer specs, and the start-up deadline (armed once the data is in,
    disarmed by the trainer's first collective)."""

    config: RunConfig
    dataset: datasets.Dataset
    specs: list
    contact: ContactDeadline
    layout_choice: dict | None = None  # --mode auto: the layouts weighed and the one chosen (drivers.choose_layout)
    profiled_memory: memory_model.HeldBeyondTensors | None = None  # --mode auto: what its profile measured


def load_run(argv: list[str] | None, prog: str) -> LoadedRun:
    """The flags, the data and the model's layer specs, each checked (UsageError on bad input)."""
    config = parse_config(argv, prog=prog)
    apply_tuned_defaults()  # read when MPI starts, which is later (in the runner)
    size_fix = "pass a larger --image-size" if config.dataset == DatasetName.FOLDER else "use larger images"
    if config.dataset == DatasetName.FOLDER:  # before any image is read: a bad size is found in a moment
        networks.model_specs(config.model, (config.channels or 1, config.image_size, config.image_size), 2,
                           config.stem, size_fix, config.dropout)
    dataset = datasets.load_dataset(config)
    specs = networks.model_specs(config.model, dataset.image_shape, dataset.num_classes, config.stem, size_fix,
                                 config.dropout)
    check_stages(config, specs)
    # Elastic workers come and go by design: Horovod's own timeouts notice a worker that never joins.
    return LoadedRun(config, dataset, specs, ContactDeadline(0 if config.elastic else config.connect_timeout))


class StopRequest:
    """SIGUSR1/SIGTERM ask for a graceful stop: the ranks agree at the next step
    boundary, save a checkpoint and exit 0 (Slurm sends these before preemption
    or the time limit). A second signal ends the process at once. The launcher's
    end asks for the same (common/launch/supervision.LauncherWatch)."""

    SIGNALS = ("SIGUSR1", "SIGTERM")

    def __init__(self):
        self.cause = None
        for name in self.SIGNALS:
            signal.signal(getattr(signal, name), self._handle)

    def _handle(self, number, frame):
        if self.cause is not None:
            os._exit(128 + number)
        self.cause = signal.Signals(number).name

    def request(self, cause: str) -> None:
        self.cause = self.cause or cause

    @property
    def requested(self) -> bool:
        return self.cause is not None


class Health:
    """What each rank tells the others at every step boundary, as one number to
    sum: 1 if it was asked to stop, world_size + 1 if it saw a non-finite loss
    (so any such rank makes the sum exceed world_size)."""

    def __init__(self, stop: StopRequest, runner: Runner, allow_nonfinite: bool):
        self.stop, self.runner, self.allow_nonfinite = stop, runner, allow_nonfinite
        self.nonfinite_at: Position | None = None

    @property
    def world_size(self) -> int:
        return self.runner.world_size  # read each time: elastic training changes it

    def check_loss(self, loss_sum: float, position: Position) -> None:
        if not self.allow_nonfinite and self.nonfinite_at is None and not math.isfinite(loss_sum):
            self.nonfinite_at = position

    def code(self) -> int:
        return (self.world_size + 1 if self.nonfinite_at else 0) + (1 if self.stop.requested else 0)

    def stop_agreed(self, total: int, position: Position) -> bool:
        """Whether the summed codes ask every rank to stop; RunStopped on a non-finite loss."""
        if total > self.world_size:
            epoch, step = self.nonfinite_at or position
            seen = "" if self.nonfinite_at else " (seen on another rank)"
            raise RunStopped(f"the loss became NaN or infinite at epoch {epoch + 1}, step {step + 1}{seen}; "
                             "stopped without saving, so the newest checkpoint is the last good one. "
                             "Lower --lr (or pass --allow-nonfinite)")
        return total > 0


class Trainer:
    def __init__(self, loaded: LoadedRun, runner: Runner, supervision: Supervision):
        config, dataset, specs = loaded.config, loaded.dataset, loaded.specs
        check_batch(config, runner.plan)
        self.layout_choice = loaded.layout_choice
        self.config, self.dataset, self.specs, self.runner = config, dataset, specs, runner
        self.collectives = runner.collectives
        self.architecture = checkpoint.architecture(
            config.model, dataset.image_shape, dataset.num_classes,
            networks.resolved_stem(config.model, config.stem, dataset.image_shape))
        self.expected_shapes = weights.expected_shapes(specs, dataset.image_shape)
        self.dropout = networks.dropout_rate(config.model, config.dropout)
        self.settle_run_directory()
        # Where each rank runs (elastic workers come and go: they have no start-up collective).
        if not runner.reads.images:
            dataset.stop_decoders()
        # An auto run's process holds its profile by now: the planner's baseline, from before
        # it, and its measured allocator share make the figure the planner chose by.
        profiled = loaded.profiled_memory or memory_model.HeldBeyondTensors(runner.memory.baseline, 0)
        self.memory_estimate = memory_model.estimate(
            specs, dataset.image_shape, memory_model.rank_load(config, runner.plan, runner.ranges, runner.rank,
                                                               self.rank_batch, runner.stashes_inputs_only,
                                                               bool(self.paths.checkpoint_dir)),
            memory_model.optimizer_slots(config.optimizer, config.momentum),
            profiled.baseline, profiled.allocator)
        places = [] if config.elastic else self.collectives.allgather_object(
            (socket.gethostname(), dataset.decoder_workers, self.memory_estimate), "hosts")
        self.hosts = [host for host, _, _ in places]
        self.decoders_by_rank = [workers for _, workers, _ in places]
        self.rank_estimates = [estimate for _, _, estimate in places]
        loaded.contact.reached()
        self.summary = self._start_summary()
        runner.start_timeline(self.paths.timeline)
        self.stop = StopRequest()
        self.launcher_watch = supervision.start(self.stop.request)
        self.faults = FaultInjection.from_environment()
        self.health = Health(self.stop, runner, config.allow_nonfinite)
        self.global_batch = config.global_batch_size(runner.data_shards)
        self.steps = datasets.steps_per_epoch(len(dataset.y_train), self.global_batch, config.steps_per_epoch)
        self.train_reader = BatchReader(dataset.x_train, dataset.y_train, runner.reads, runner.feed,
                                        dataset.encoded_reader("train"))
        self.test_reader = BatchReader(dataset.x_test, dataset.y_test, runner.reads, runner.feed,
                                       dataset.encoded_reader("test"))
        self.writer = metrics.JsonLinesWriter(self.paths.metrics_file if runner.primary else "")
        # Epochs the metrics file and TensorBoard already hold: a run stopped after an epoch's
        # record but before its checkpoint trains that epoch again on resume, and records it once.
        self.recorded_through = 0
        self.reached: Position | None = None  # elastic training: the last position reached
        self.progress = ProgressBar(False, 0, 0, 0)
        self.tensorboard: TensorBoardLog | None = None
        if self.paths.tensorboard:  # every rank learns whether the primary could open it
            self.on_primary_for_all(self._open_tensorboard, "tensorboard")

    def _start_summary(self) -> RunSummary:
        """The run summary as far as the start knows it: the layout, the hosts and the data."""
        config, runner, dataset, plan = self.config, self.runner, self.dataset, self.runner.plan
        return RunSummary(
            framework=runner.framework, mode=plan.mode, world_size=runner.world_size, dp=plan.dp, pp=plan.pp,
            epochs=config.epochs, dataset=str(config.dataset), train_samples=len(dataset.y_train),
            test_samples=len(dataset.y_test), image_shape=list(dataset.image_shape),
            layer_ranges=[(first, end) for first, end in runner.ranges],
            stage_ranks=[plan.stage_ranks(s) for s in range(plan.pp)] if plan.pipelined else [],
            schedule=str(config.schedule), microbatches=config.microbatches, virtual_stages=plan.chunks,
            partition_costs=[float(cost) for cost in runner.layer_costs],
            last_piece_costs=[float(cost) for cost in runner.last_piece_costs], hosts=summary.host_ranks(self.hosts),
            decoder_processes=self.decoders_by_rank, decode_on_device=dataset.decode_on_device,
            memory_kind=runner.memory.kind, layout_choice=self.layout_choice,
            predicted_memory=[estimate.record() for estimate in self.rank_estimates])

    def _open_tensorboard(self) -> None:
        from common.observe.tensorboard import TensorBoardLog
        try:
            self.tensorboard = TensorBoardLog(self.paths.tensorboard, run_dir.resolved(self.config, self.paths),
                                              sys.argv)
        except OSError as error:
            raise UsageError(f"cannot write TensorBoard events to {self.paths.tensorboard} ({error.strerror}); "
                             "choose a writable --tensorboard DIR (or --run-dir)") from None

    @property
    def rank_batch(self) -> int:
        """A replica's share of the global batch: what it trains on, reads ahead, and evaluates
        in (read each time: elastic training changes the replicas)."""
        return -(-self.config.global_batch_size(self.runner.data_shards) // self.runner.data_shards)

    def settle_run_directory(self) -> None:
        """The primary claims the run directory and records the launch; every rank then
        sends the outputs it was not told to put elsewhere there."""
        config, runner = self.config, self.runner

        def claim():
            directory = run_dir.claim(config, runner.framework)
            paths = run_dir.place_outputs(config, directory)
            if directory:
                run_dir.record(directory, config, runner.framework, runner.world_size, repeat_toml=as_toml(config),
                               paths=paths)
            return directory
        if config.elastic:  # a worker that joins later has no start-up collective to take part in
            named = None if config.run_dir == run_dir.NO_RUN_DIR else config.run_dir
            self.paths = run_dir.place_outputs(config, claim() if runner.primary else named)
        else:
            self.paths = run_dir.place_outputs(config, self.on_primary_for_all(claim, "run_dir"))

    def run(self) -> metrics.Evaluation | None:
        """Train and evaluate; the test (loss, accuracy), or None when stopped early."""
        self._log_start()
        try:
            test = self._train()
            self.write_summary()
            return test
        except RunStopped as error:
            self.summary.outcome, self.summary.error = Outcome.FAILED, str(error)
            self.write_summary()
            raise
        finally:
            self.launcher_watch.close()
            self.progress.close()
            self.dataset.close()
            if self.tensorboard:
                self.tensorboard.close()

    def _train(self) -> metrics.Evaluation | None:
        if self.config.elastic:  # data mode only (validate), whose runners are elastic
            elastic = cast(ElasticRunner, self.runner)
            return cast("metrics.Evaluation | None", elastic.run_elastic(self.restore, self.train_from))
        test = self.train_from(self.restore())
        if self.runner.timeline.enabled:
            self.runner.timeline.at_step(-1)  # nothing after the run belongs to a step
            self.runner.write_timeline()
        return test

    def write_summary(self) -> None:
        path = self.paths.summary_file
        if path and self.runner.primary:
            self.write_output("run summary", path, lambda: summary.write(path, self.summary), lambda: None)

    # --- the loop, top to bottom ----------------------------------------------------

    def train_from(self, start: Position, commit: Callable | None = None) -> metrics.Evaluation | None:
        """Epochs from ``start`` to the end. ``commit(epoch, step)``, if given, is told each
        position reached (elastic training keeps its recoverable state with it)."""
        start_epoch, start_step = start
        if commit is not None:  # elastic training: this call may be Horovod starting its loop again
            commit = self._elastic_restart(start, commit)
        self._note_position(start)
        if self.runner.world_size != self.summary.world_size:  # elastic training: workers came or went
            self.summary.membership_changes.append(MembershipChange(self.summary.world_size, self.runner.world_size,
                                                                    start_epoch, start_step))
            self.summary.world_size = self.runner.world_size
        test = None
        self.progress.close()  # elastic training starts over here after a reset
        self.progress = ProgressBar(self.config.progress and self.runner.primary, self.config.epochs, self.steps,
                                    start_epoch * self.steps + start_step)
        for epoch in range(start_epoch, self.config.epochs):
            train = self.train_epoch(epoch, start_step if epoch == start_epoch else 0, commit)
            if train.stopped_after is not None:
                # Every step's loss is read now: never save one that was not finite.
                self.health.stop_agreed(self.collectives.flag_sum(self.health.code()),
                                        (epoch, train.stopped_after - 1))
                self.stop_at((epoch, train.stopped_after))
                return None
            # Before saving: never let a non-finite last step overwrite a good checkpoint.
            stopping = self.health.stop_agreed(self.collectives.flag_sum(self.health.code()),
                                               (epoch, self.steps - 1))
            test = self.evaluate()
            self.record(epoch, train, test)
            self._note_position((epoch + 1, 0))
            path = self.save((epoch + 1, 0))
            if commit:
                commit(epoch + 1, 0)
            if stopping and epoch + 1 < self.config.epochs:
                self.report_stop((epoch + 1, 0), path)
                return None
        if test is None:
            test = self.evaluate()
            self.record_evaluation(start_epoch, test)
        self.summary.outcome, self.summary.test_loss, self.summary.test_accuracy = (
            Outcome.COMPLETED, test.loss, test.accuracy)
        if self.runner.primary:
            metrics.log(f"final test accuracy: {test.accuracy:.4f}  (test loss {test.loss:.4f})")
        return test

    def _elastic_restart(self, start: Position, commit: Callable) -> Callable:
        """Records a restart of the elastic loop (a rollback if ``start`` is before the last
        position reached); ``commit``, noting each position it is told."""
        if self.reached is not None:
            epochs_done, steps_into_next = start
            self.summary.elastic_restarts.append(ElasticRestart(self.runner.world_size, epochs_done, steps_into_next,
                                                                rolled_back=tuple(start) < self.reached))
        self.reached = tuple(start)

        def noting(epoch: int, step: int) -> None:
            self.reached = (epoch, step)
            commit(epoch, step)
        return noting

    def _note_position(self, position: Position) -> None:
        self.summary.epochs_done, self.summary.steps_into_next = position

    def train_epoch(self, epoch: int, first_step: int, commit: Callable | None = None) -> metrics.EpochResult:
        """Steps first_step.. of ``epoch``; stops early, every rank together, on a stop
        request (saying after how many steps) or a non-finite loss (raising RunStopped).

        A step's sums are read once the next step has been handed to the runner (a GPU
        then has the next step queued while the host waits for them), so a non-finite
        loss is noticed a step later; nothing is saved before every step is read."""
        runner, config = self.runner, self.config
        global_batch = config.global_batch_size(runner.data_shards)
        batches = datasets.rank_batches(len(self.dataset.y_train), global_batch, runner.data_shards, runner.data_shard,
                                    config.seed, epoch, config.steps_per_epoch)
        ahead = batches[first_step:]
        self.dataset.plan_train(np.concatenate([indices for indices, _ in ahead]) if ahead else np.arange(0),
                                epoch, config.prefetch_batches * self.rank_batch)
        meter, images, step_lr, stopped_after = metrics.Meter(), 0, config.lr, None
        unread = None  # the previous step: (its sums, epoch, step)

        def read(step_sums, at_epoch, at_step):
            sums = metrics.resolved(step_sums)
            self.health.check_loss(float(sums[metrics.LOSS_SUM]), (at_epoch, at_step))
            meter.sums += sums
            self.log_step_loss(at_epoch * self.steps + at_step + 1, sums)

        stopwatch = metrics.Stopwatch()
        prefetch = Prefetcher(functools.partial(self.train_reader.read, epoch=epoch), runner.feed.stage,
                              [indices for indices, _ in ahead], config.prefetch_batches)
        blank = BlankCount()
        try:
            for step, (_, global_count) in enumerate(ahead, start=first_step):
                step_lr = lr.lr_at(epoch * self.steps + step, self.steps, config, runner.data_shards)
                runner.set_lr(step_lr)
                # A sync point: a signal or a non-finite loss may have reached only some ranks.
                agreed = self.collectives.start_flag_sum(self.health.code())
                self.faults.at(runner.rank, epoch * self.steps + step)
                runner.timeline.at_step(epoch * self.steps + step)
                sums = runner.train_step(blank.of(self.next_batch(prefetch)), global_count)
                if unread is not None:
                    read(*unread)
                unread = (sums, epoch, step)
                images += global_count
                self.progress.step(epoch, meter.mean_loss, images / stopwatch.seconds())
                if self.health.stop_agreed(agreed(), (epoch, step)) and step + 1 < len(batches):
                    stopped_after = step + 1
                    break
                if commit and step + 1 < len(batches):
                    commit(epoch, step + 1)
            if unread is not None:
                read(*unread)
        finally:
            prefetch.close()
        seconds = stopwatch.seconds()
        waited = prefetch.wait_seconds if runner.reads.images else 0.0
        # One allreduce: the metric sums, and the data wait of the ranks that read images.
        totals = metrics.EpochSums(*self.collectives.allreduce_sums(
            np.append(meter.sums, (waited, 1.0 if runner.reads.images else 0.0, blank.total)), "train_sums"))
        train = metrics.Meter.results(totals[:3])
        peaks = self.collectives.allgather_object(runner.memory.peak(), "memory_peaks")
        return metrics.EpochResult(peak_memory=tuple(peaks),
                                   loss=train.loss, accuracy=train.accuracy,
                                   images_per_sec=images / seconds if seconds > 0 else 0.0, seconds=seconds,
                                   lr=step_lr, stopped_after=stopped_after, data_wait=totals.wait_share(seconds),
                                   steps=(stopped_after or len(batches)) - first_step, blank=int(totals.blank))

    def next_batch(self, prefetch) -> Batch:
        if not self.runner.reads.images:
            return prefetch.next()
        with self.runner.timeline.span("wait for batch", "data"):
            return prefetch.next()

    def log_step_loss(self, global_step: int, sums) -> None:
        """--tensorboard: every --log-every steps, the global batch's mean loss (one small
        allreduce: the loss lives on the ranks that compute it, a pipeline's last stage)."""
        every = self.config.log_every
        if not (self.paths.tensorboard and every and global_step % every == 0):
            return
        if global_step <= self.recorded_through * self.steps:  # every rank knows: all take part or none
            return
        loss_sum, _, count = self.collectives.allreduce_sums(np.asarray(sums, dtype=np.float64), "step_loss")
        board = self.tensorboard
        if board and count:
            self.write_output("TensorBoard events", board.path, lambda: board.step_loss(global_step, loss_sum / count),
                              self._stop_tensorboard)

    def evaluate(self) -> metrics.Evaluation:
        """(loss, accuracy) on the test set: each replica its slice, in batches of the
        rank's training share (--batch-size over the replicas), read ahead as in training."""
        runner, dataset = self.runner, self.dataset
        shard = datasets.eval_shard(len(dataset.y_test), runner.data_shards, runner.data_shard)
        dataset.plan_test(shard, self.config.prefetch_batches * self.rank_batch)
        prefetch = Prefetcher(self.test_reader.read, runner.feed.stage, list(datasets.batched(shard, self.rank_batch)),
                              self.config.prefetch_batches)
        blank = BlankCount()
        try:
            sums = metrics.resolved(runner.evaluate(map(blank.of, prefetch)))
        finally:
            prefetch.close()
        *totals, blanked = self.collectives.allreduce_sums(np.append(sums, blank.total), "eval_sums")
        return metrics.Meter.results(totals)._replace(blank=int(blanked))

    def record(self, epoch: int, train: metrics.EpochResult, test: metrics.Evaluation) -> None:
        fresh = epoch + 1 > self.recorded_through
        self.recorded_through = max(self.recorded_through, epoch + 1)  # on every rank (log_step_loss)
        if not self.runner.primary:
            return
        record = metrics.epoch_record(epoch + 1, train, test, self.runner.world_size, self.config,
                                      self.runner.framework, [estimate.total for estimate in self.rank_estimates])
        self.summary.peak_memory = list(train.peak_memory)
        with self.progress.paused():
            metrics.log(metrics.format_epoch(record, self.config.epochs))
        if fresh:
            self._publish(record)

    def record_evaluation(self, epochs_done: int, test: metrics.Evaluation) -> None:
        if self.runner.primary:
            self._publish(metrics.evaluation_record(epochs_done, test, self.runner.world_size, self.config,
                                                    self.runner.framework))

    def _publish(self, record: dict) -> None:
        """A record to the metrics file and TensorBoard (each when asked for)."""
        if self.writer.path:
            self.write_output("metrics file", self.writer.path, lambda: self.writer.write(record), self._stop_metrics)
        board = self.tensorboard
        if board:
            self.write_output("TensorBoard events", board.path, lambda: board.epoch(record), self._stop_tensorboard)

    def write_output(self, what: str, path: str, write: Callable[[], None], stop: Callable[[], None]) -> None:
        """On the primary: ``write``, which leaves its file whole when it fails (a full disk).
        Then the job stops with one line, or, with --keep-going-on-save-error, ``stop`` ends
        that output and training goes on."""
        try:
            write()
            return
        except OSError as error:
            problem = f"cannot write the {what} {path} ({error.strerror}; {checkpoint.free_space(path)})"
        if not self.config.keep_going_on_save_error:
            raise RankUsageError(f"{problem}; what it holds so far is intact, and so are the checkpoints. "
                                 "Free space there or write it elsewhere, then --resume; or pass "
                                 "--keep-going-on-save-error")
        metrics.log(f"warning: {problem}; no more {what} for this run (--keep-going-on-save-error)")
        stop()

    def _stop_metrics(self) -> None:
        self.writer = metrics.JsonLinesWriter("")

    def _stop_tensorboard(self) -> None:
        if self.tensorboard:
            self.tensorboard.close()
        self.tensorboard = None

    # --- stopping ---------------------------------------------------------------------

    def stop_at(self, position: Position) -> None:
        """Every rank agreed to stop after ``position``: save it and report."""
        self.report_stop(position, self.save(position))

    def report_stop(self, position: Position, path: str | None) -> None:
        epoch, step = position
        cause = self.stop.cause or "a signal to another rank"
        self._note_position(position)
        self.summary.outcome, self.summary.stop = Outcome.STOPPED, Stop(cause, epoch, step, path)
        if self.runner.primary:
            where = f"after {step} steps of epoch {epoch + 1}" if step else f"after epoch {epoch}"
            unsaved = "the save failed" if self.paths.checkpoint_dir else "no --checkpoint-dir"
            saved = f"saved {path}; continue with --resume" if path else f"nothing saved ({unsaved})"
            metrics.log(f"stopped by {cause} {where}; {saved}")
        return None

    # --- checkpoints --------------------------------------------------------------------

    def save(self, position: Position) -> str | None:
        """Collective: each writing rank stores its shard, then the primary commits."""
        if not self.paths.checkpoint_dir:
            return None
        path = checkpoint.checkpoint_path(self.paths.checkpoint_dir, position)
        temporary = checkpoint.temporary_path(path)
        shard = self.runner.checkpoint_shard()
        failed, size, errno = 0, 0, 0
        if shard is not None:
            size = checkpoint.shard_bytes(shard[1])
            try:
                checkpoint.write_shard(temporary, *shard)
            except OSError as error:
                failed, errno = 1, error.errno or 0
        # A sync point: every shard is on disk (or some rank failed) before the commit.
        failures, size, errnos = self.collectives.allreduce_sums(np.array([failed, size, errno], np.float64), "save")
        if failures:
            if self.runner.primary:
                checkpoint.abandon(temporary)
            self.save_failed(path, os.strerror(int(errnos // failures)), size, everywhere=True)
            return None
        if not self.runner.primary:
            return path
        meta = checkpoint.make_meta(position, self.architecture, run_dir.resolved(self.config, self.paths),
                                    self.runner.checkpoint_shards, self.runner.framework,
                                    {"mode": self.runner.plan.mode, "pp": self.runner.plan.pp,
                                     "dp": self.runner.plan.dp}, checkpoint.rng_state(),
                                    loss_scale.record() if (loss_scale := self.runner.loss_scale()) else None,
                                    self.dropout)
        try:
            checkpoint.commit(temporary, path, meta, before_rename=lambda: self.faults.at(self.runner.rank, "save"))
        except OSError as error:
            checkpoint.abandon(temporary)
            self.save_failed(path, error.strerror or str(error), size, everywhere=False)
            return None
        checkpoint.prune(self.paths.checkpoint_dir, self.config.keep_checkpoints)
        return path

    def save_failed(self, path: str, reason: str, size: float, everywhere: bool) -> None:
        """A checkpoint that could not be written (its partial files are gone): stop the job
        with one line (every rank raises alike when ``everywhere``; else only the primary
        knows and ends the job itself) or, with --keep-going-on-save-error, warn and go on."""
        problem = (f"could not save checkpoint {path} ({reason}; it needs {size / 2**20:.1f} MB, "
                   f"{checkpoint.free_space(path)})")
        if self.config.keep_going_on_save_error:
            if self.runner.primary:
                metrics.log(f"warning: {problem}; training on without it (--keep-going-on-save-error)")
            return None
        message = (f"{problem}; the previous checkpoints are intact. Free space there or choose another "
                   "--checkpoint-dir (or --run-dir), then --resume; or pass --keep-going-on-save-error")
        raise UsageError(message) if everywhere else RankUsageError(message)

    def restore(self) -> Position:
        """Resume or initialise weights as the flags ask; returns where to start."""
        config = self.config
        if self.paths.checkpoint_dir:
            self.on_primary_for_all(lambda: checkpoint.prepare_directory(self.paths.checkpoint_dir, config.resume),
                                    "checkpoint_dir")
        path, start, rng, scale = None, (0, 0), None, None
        if config.resume:
            path, start, rng, scale = self.on_primary_for_all(self._newest_valid, "resume")
            self.recorded_through = self.on_primary_for_all(
                lambda: metrics.last_epoch_recorded(self.paths.metrics_file) if self.paths.metrics_file else 0,
                "recorded_through")
        elif config.init_from:
            path = config.init_from
            self.on_primary_for_all(lambda: self.open_checkpoint(path) and None, "init_from")  # checks it loads
        if rng:
            checkpoint.restore_rng(rng)
        if config.amp == Amp.FP16 and (recorded := DynamicLossScale.from_record(scale)):
            self.runner.restore_loss_scale(recorded)  # else a resumed run would start over at --loss-scale
        self.runner.load_state((lambda: self.open_checkpoint(path)) if path else None, with_optimizer=config.resume)
        return tuple(start)

    def open_checkpoint(self, path: str) -> checkpoint.Checkpoint:
        return checkpoint.Checkpoint(path, self.architecture, self.expected_shapes)

    def _newest_valid(self) -> tuple:
        """(path, position, RNG state) of the newest checkpoint that loads, saying which;
        older ones only if newer ones fail."""
        problems = []
        for _, path in reversed(checkpoint.list_checkpoints(self.paths.checkpoint_dir)):
            try:
                opened = self.open_checkpoint(path)
                opened.check_optimizer(self.config.optimizer)
            except checkpoint.CheckpointMismatch:
                raise  # the wrong model or optimizer is the user's mistake, not a damaged file
            except UsageError as error:
                problems.append(str(error))
                metrics.log(f"skipping {path}: it does not load")
                self.summary.skipped_checkpoints.append(path)
                continue
            epoch, step = opened.position
            where = f"{step} steps into epoch {epoch + 1}" if step else f"after epoch {epoch}"
            metrics.log(f"resumed from {path} ({where})")
            recorded = opened.meta.get("dropout")
            if isinstance(recorded, (int, float)) and recorded != self.dropout:
                metrics.log(f"warning: {path} was trained with --dropout {recorded:g}; this run drops "
                            f"{self.dropout:g} (pass --dropout {recorded:g} to continue as it was)")
            self.summary.resumed = Resumed(path, epoch, step)
            return path, opened.position, opened.meta.get("rng"), opened.meta.get("loss_scale")
        raise UsageError(problems[0] if len(problems) == 1 else
                         f"no checkpoint in {self.paths.checkpoint_dir} loads ({len(problems)} tried; "
                         f"newest: {problems[0]})")

    def on_primary_for_all(self, action: Callable, name: str):
        """Run ``action`` on the primary rank only and share its result, or the
        UsageError it raised, so every rank goes on (or ends) together."""
        result, problem = None, None
        if self.runner.primary:
            try:
                result = action()
            except UsageError as error:
                problem = str(error)
        problem, result = self.collectives.broadcast_object((problem, result), name)
        if problem:
            raise UsageError(problem)
        return result

    def _log_start(self) -> None:
        runner, config, dataset = self.runner, self.config, self.dataset
        if not runner.primary:
            return
        dropping = f", dropout {self.dropout:g}" if self.dropout else ""
        metrics.log(f"{runner.framework}: {config.model} ({networks.total_params(self.specs, dataset.image_shape):,} "
                    f"params{dropping}) on {dataset.name} {len(dataset.y_train)} train / {len(dataset.y_test)} test "
                    f"{'x'.join(map(str, dataset.image_shape))}; {describe(runner.plan, config)}, "
                    f"global batch {self.global_batch}, {self.steps} steps/epoch, {runner.threads} threads/rank "
                    f"({'--threads' if config.threads else read_cpu_share().threads()[1]})")
        if dataset.streamed:
            workers = max(self.decoders_by_rank, default=dataset.decoder_workers)
            decoding = ("JPEGs decoded on the GPU (--decode gpu), other files by "
                        if dataset.decode_on_device else "")
            metrics.log(f"images streamed from disk: {decoding}{workers or 'no'} decoder "
                        f"process{'es' if workers != 1 else ''}/rank, {config.prefetch_batches} batches ahead, "
                        f"augmentation {'on' if config.augment else 'off'}")
        if len(self.hosts) > 1:
            metrics.log(host_placement(self.hosts))
        notice = hardware.emulated_precision_notice(config.amp, runner.feed.on_gpu)
        if notice:
            metrics.log(notice)
        for line in runner.layout:
            metrics.log(line)
        metrics.log(self._memory_line())
        if self.paths.run_dir != run_dir.NO_RUN_DIR:
            logdir = os.path.dirname(self.paths.run_dir) or "."
            metrics.log(f"run directory: {self.paths.run_dir}  (tensorboard --logdir {logdir})")


    def _memory_line(self) -> str:
        """The predicted peak of the rank that holds the most (every rank's, when they differ)."""
        estimates = self.rank_estimates or [self.memory_estimate]
        largest = max(range(len(estimates)), key=lambda rank: estimates[rank].total)
        totals = {memory_model.mebibytes(estimate.total) for estimate in estimates}
        each = (f"; rank by rank {', '.join(memory_model.mebibytes(e.total) for e in estimates)}"
                if len(totals) > 1 else "")
        return (f"memory per rank ({self.runner.memory.kind}), predicted: {estimates[largest].describe()}"
                f"{f' on rank {largest}' if len(estimates) > 1 else ''}{each}")


def describe(plan, config: RunConfig) -> str:
    if plan.mode == Mode.PS:
        return f"parameter server: rank 0 serves {plan.dp} worker(s)"
    if not plan.pipelined:
        return f"data parallel on {plan.world_size} rank(s)"
    return (f"{plan.mode} parallel: {plan.pp} stages x {plan.dp} replica(s), {config.microbatches} "
            f"micro-batches, {config.schedule}")


def run(loaded: LoadedRun, runner: Runner, supervision: Supervision) -> metrics.Evaluation | None:
    return Trainer(loaded, runner, supervision).run()
