"""--mode auto: every layout a world size allows, each one's predicted throughput and peak
memory per rank, and the fastest that fits. Pure arithmetic on a Profile (what this
hardware measured once); no framework, no MPI.

The time model:
- a layer's forward and backward seconds at any micro-batch size, from the profile's two
  timed sizes (a straight line through them: a fixed cost per call plus a cost per sample);
- --recompute: each layer's backward also pays a share of its forward, as much as
  recomputing cost the whole model's step when the profile timed it;
- data parallel: forward, then the backward or the gradients' ring allreduce, whichever
  is longer (Horovod overlaps them) on a GPU, both on a CPU (whose cores the ring's
  reductions share with the backward); forward and backward slowed by the contention
  where the ranks share a node's CPUs;
- a pipeline: the schedule's own step (common/parallel/schedule.shared_step_time) over the
  pieces the cut makes, each message across a cut paying the network's latency and
  bandwidth, pieces before the last paying a recomputed forward where the framework
  recomputes; where ranks share a node's CPUs, each moment slowed by as much as the
  profile measured for as many of them computing at once (a bubble, with fewer
  computing, runs faster than the crowded steady state); then, hybrid, each stage's
  allreduce over its replicas after the flush.
The memory model is common/parallel/memory_model.py's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from math import prod

from common.core.config import Mode, RunConfig, Schedule
from common.core.errors import UsageError
from common.model import networks
from common.observe.run_dir import NO_RUN_DIR
from common.parallel import memory_model, plan, schedule
from common.parallel.memory_model import mebibytes

LayerTimes = Sequence[tuple[float, float]]  # (forward, backward) seconds of each layer


@dataclass(frozen=True)
class Network:
    """Point-to-point messages between two ranks: seconds = latency + bytes / bandwidth."""
    latency: float
    bandwidth: float  # bytes per second
    ring_step_latency: float | None = None  # what each step of an allreduce waits, measured by one
                                            # over every rank (a step waits on the slowest rank, and
                                            # ranks that share CPUs on being scheduled); else latency

    def message_seconds(self, size: float) -> float:
        return self.latency + size / self.bandwidth

    def allreduce_seconds(self, size: float, ranks: int) -> float:
        """A ring allreduce: 2 (n - 1) steps, each moving 1/n of the buffer."""
        if ranks < 2:
            return 0.0
        step_latency = self.latency if self.ring_step_latency is None else self.ring_step_latency
        return 2 * (ranks - 1) * (step_latency + size / ranks / self.bandwidth)

    def with_allreduce_timed(self, size: float, ranks: int, seconds: float) -> Network:
        """This network, its ring steps' latency what an allreduce of ``size`` bytes over
        ``ranks`` took in ``seconds`` beyond moving the bytes (never below a message's)."""
        if ranks < 2:
            return self
        moved = size / ranks / self.bandwidth
        return replace(self, ring_step_latency=max(self.latency, seconds / (2 * (ranks - 1)) - moved))


@dataclass(frozen=True)
class Profile:
    """What this hardware measured once, for one network and one image shape."""
    samples: tuple[int, int]             # the two micro-batch sizes the layers were timed at
    times: tuple[LayerTimes, LayerTimes]  # each layer's (forward, backward) at those sizes
    network: Network
    recomputes_forward: bool             # pieces before the model's last run their forward again
    baseline: int                        # bytes a rank holds before it builds its model
    allocator: int = 0                   # bytes a rank holds beyond its tensors (memory_model.allocator_excess)
    allreduce_overlaps: bool = True      # data parallel's allreduce runs beside the backward (a GPU's
                                         # rank); on a CPU its reductions take the backward's cores
    recompute_forwards: tuple[float, float] = (1.0, 1.0)  # what --recompute adds to a step, in forwards, at
                                         # the two sizes, measured (a forward again, plus its per-layer
                                         # bookkeeping: much more than a forward for small micro-batches)
    contention: float = 1.0              # how much slower a rank computes while every rank of its node
                                         # computes (the layer times are a rank's alone): measured, the
                                         # whole step timed by all at once against by one alone; for a
                                         # dry run in one process, the threads the ranks want per CPU
    busy_slowdowns: tuple[float, ...] = ()  # the same while k of the node's ranks compute and the rest
                                         # wait, for k = 1 (1.0) to all of them (the contention);
                                         # (): every moment at the contention

    def slowdown_while(self, share: float) -> float:
        """How much slower each computing rank runs while ``share`` of its node's ranks
        compute (on the line between the two nearest counts measured)."""
        if not self.busy_slowdowns:
            return self.contention
        busy = min(max(1.0, share * len(self.busy_slowdowns)), float(len(self.busy_slowdowns)))
        below = int(busy)
        if below == len(self.busy_slowdowns):
            return self.busy_slowdowns[-1]
        low, high = self.busy_slowdowns[below - 1], self.busy_slowdowns[below]
        return low + (high - low) * (busy - below)

    def layer_times(self, samples: int, recompute: bool = False) -> list[tuple[float, float]]:
        """Each layer's (forward, backward) seconds for ``samples``, on the line through the
        two timed sizes (never below a tenth of the smaller size's time), as one rank computes
        them alone; ``recompute``: each backward also pays the measured recompute, a share of its forward."""
        (low, high), (low_times, high_times) = self.samples, self.times
        span = max(1, high - low)

        def at(t0: float, t1: float) -> float:
            return max(0.1 * t0, t0 + (t1 - t0) * (samples - low) / span)
        times = [(at(f0, f1), at(b0, b1)) for (f0, b0), (f1, b1) in zip(low_times, high_times)]
        if not recompute:
            return times
        low_forwards, high_forwards = self.recompute_forwards
        share = min(max(low, samples), high) - low
        forwards = low_forwards + (high_forwards - low_forwards) * share / span
        return [(forward, backward + forwards * forward) for forward, backward in times]


def calibrated(times: LayerTimes, whole_seconds: float) -> list[tuple[float, float]]:
    """Layer times timed one by one, scaled to add up to ``whole_seconds``, the whole model's
    forward and backward timed as one call: a layer alone pays a call of its own (and, in a
    framework that compiles its step, runs uncompiled) and, under a loaded node, may run in
    a quiet moment; the whole step pays what a run pays."""
    total = sum(forward + backward for forward, backward in times)
    scale = whole_seconds / total if total > 0 and whole_seconds > 0 else 1.0
    return [(scale * forward, scale * backward) for forward, backward in times]


def recompute_forwards(times: LayerTimes, whole_seconds: float, recomputing_seconds: float) -> float:
    """What --recompute adds to the step, in forwards: the whole model's step timed with it
    (``recomputing_seconds``) against without (``whole_seconds``), over the forward of the
    layer ``times`` (never below nothing)."""
    forward = sum(f for f, _ in times)
    return max(0.0, recomputing_seconds - whole_seconds) / forward if forward > 0 else 1.0


@dataclass(frozen=True)
class Layout:
    """One way to run the job on ``pp * dp`` ranks."""
    mode: Mode
    pp: int = 1
    dp: int = 1
    microbatches: int = 1
    schedule: Schedule = Schedule.ONE_F_ONE_B
    virtual_stages: int = 1
    recompute: bool = False          # --recompute

    @property
    def pipelined(self) -> bool:
        return self.mode != Mode.DATA

    @property
    def chunks(self) -> int:
        return self.virtual_stages if self.schedule == Schedule.INTERLEAVED else 1

    def describe(self) -> str:
        recompute = " recompute" if self.recompute else ""
        if not self.pipelined:
            return f"data dp{self.dp}{recompute}"
        chunks = f" V{self.virtual_stages}" if self.chunks > 1 else ""
        replicas = f" x dp{self.dp}" if self.mode == Mode.HYBRID else ""
        return f"{self.mode} pp{self.pp}{replicas} {self.schedule} M{self.microbatches}{chunks}{recompute}"

    def flags(self, split: str) -> list[str]:
        """The command line that runs this layout by hand."""
        recompute = ["--recompute"] if self.recompute else []
        if not self.pipelined:
            return ["--mode", "data", *recompute]
        found = ["--mode", str(self.mode), "--pp", str(self.pp), "--microbatches", str(self.microbatches),
                 "--schedule", str(self.schedule)]
        if self.mode == Mode.HYBRID:
            found += ["--dp", str(self.dp)]
        if self.chunks > 1:
            found += ["--virtual-stages", str(self.virtual_stages)]
        return found + recompute + (["--split", split] if split else [])

    def applied(self, config: RunConfig, split: str) -> RunConfig:
        """``config`` running this layout, its cut given as ``split``."""
        if not self.pipelined:
            return replace(config, mode=Mode.DATA, pp=0, dp=0, microbatches=1, split="", memory_per_rank="",
                           recompute=self.recompute)
        return replace(config, mode=self.mode, memory_per_rank="", pp=self.pp, recompute=self.recompute,
                       dp=self.dp if self.mode == Mode.HYBRID else 0,
                       microbatches=self.microbatches, schedule=self.schedule,
                       virtual_stages=self.virtual_stages if self.chunks > 1 else config.virtual_stages,
                       split=split)


@dataclass(frozen=True)
class Prediction:
    layout: Layout
    step_seconds: float
    images_per_sec: float
    memory: Sequence[int]               # each stage's peak bytes per rank (data: one)
    split: str = ""                     # the cut, as --split takes it
    rejected: str = ""                  # why it was not chosen, when it was not for speed

    @property
    def peak_memory(self) -> int:
        return max(self.memory)


MICROBATCH_FACTORS = (1, 2, 4, 8)  # micro-batches per step, in multiples of the stages


def layouts(world_size: int, num_layers: int, batch_size: int) -> list[Layout]:
    """Every layout to weigh on ``world_size`` ranks: data parallel; each pipeline depth that
    divides the ranks (model, or hybrid with the rest as replicas), each schedule, with
    pp, 2 pp, 4 pp and 8 pp micro-batches (each needs a sample of every replica's share),
    interleaved with two pieces a rank where the model has the layers; each with and
    without --recompute (but zb, whose split backward needs the layers' outputs)."""
    kept = _layouts_keeping(world_size, num_layers, batch_size)
    return kept + [replace(layout, recompute=True) for layout in kept if layout.schedule != Schedule.ZERO_BUBBLE
                   or not layout.pipelined]


def _layouts_keeping(world_size: int, num_layers: int, batch_size: int) -> list[Layout]:
    found = [Layout(Mode.DATA, 1, world_size)] if batch_size >= world_size else []
    for pp in range(2, min(world_size, num_layers) + 1):
        if world_size % pp:
            continue
        dp = world_size // pp
        mode = Mode.MODEL if dp == 1 else Mode.HYBRID
        for factor in MICROBATCH_FACTORS:
            microbatches = factor * pp
            if dp * microbatches > batch_size:
                break
            for kind in (Schedule.GPIPE, Schedule.ONE_F_ONE_B, Schedule.ZERO_BUBBLE):
                found.append(Layout(mode, pp, dp, microbatches, kind))
            if 2 * pp <= num_layers:
                found.append(Layout(mode, pp, dp, microbatches, Schedule.INTERLEAVED, 2))
    return found


def predict(layout: Layout, specs: Sequence, input_shape: tuple, config: RunConfig, profile: Profile) -> Prediction:
    """The layout's step time, throughput and each stage's peak memory per rank."""
    batch = config.global_batch_size(layout.dp)
    rank_batch = -(-batch // layout.dp)
    costs = networks.layer_costs(specs, input_shape)
    slots = memory_model.optimizer_slots(config.optimizer, config.momentum)
    scaled = replace(config, microbatches=layout.microbatches, schedule=layout.schedule,
                     virtual_stages=layout.virtual_stages, recompute=layout.recompute)
    run_plan = plan.ParallelPlan(str(layout.mode), layout.pp, layout.dp, chunks=layout.chunks)
    saves = bool(config.checkpoint_dir) or config.run_dir != NO_RUN_DIR  # a run directory holds checkpoints

    def memory_of(ranges, recomputes):
        found = []
        for stage in range(layout.pp):
            load = memory_model.rank_load(scaled, run_plan, ranges, stage, rank_batch, recomputes, saves)
            found.append(memory_model.estimate(specs, input_shape, load, slots, profile.baseline,
                                               profile.allocator).total)
        return found

    if not layout.pipelined:
        times = profile.layer_times(rank_batch, layout.recompute)
        forward, backward = sum(f for f, _ in times), sum(b for _, b in times)
        gradients = memory_model.FLOAT_BYTES * sum(cost.params for cost in costs)
        allreduce = profile.network.allreduce_seconds(gradients, layout.dp)
        forward, backward = profile.contention * forward, profile.contention * backward  # every rank computes
        seconds = forward + (max(backward, allreduce) if profile.allreduce_overlaps else backward + allreduce)
        return Prediction(layout, seconds, batch / seconds, memory_of([(0, len(specs))], False))

    microbatch = -(-rank_batch // layout.microbatches)
    times = profile.layer_times(microbatch, layout.recompute)
    charged, last = plan.timed_costs(times, profile.recomputes_forward)
    ranges = plan.partition(charged, layout.pp, "", layout.chunks, layout.microbatches, last)
    pieces = len(ranges)
    forwards = [sum(f for f, _ in times[a:b]) for a, b in ranges]
    backwards = [sum(b for _, b in times[a:e]) + (sum(f for f, _ in times[a:e]) if profile.recomputes_forward
                                                  and v < pieces - 1 else 0.0) for v, (a, e) in enumerate(ranges)]
    shapes = networks.layer_shapes(specs, input_shape)
    messages = [profile.network.message_seconds(memory_model.FLOAT_BYTES * microbatch * prod(shapes[end]))
                for _, end in ranges]
    # Ranks sharing a node's CPUs slow each other while they compute at once, as much as the
    # profile measured for as many computing (the replicas run the same schedule in step).
    seconds = schedule.shared_step_time(schedule.stage_schedules(str(layout.schedule), layout.pp,
                                                                 layout.microbatches, layout.chunks),
                                        forwards, backwards, messages,
                                        lambda busy: profile.slowdown_while(busy / layout.pp))
    if layout.dp > 1:
        stage_params = [0] * layout.pp
        for v, (a, e) in enumerate(ranges):
            stage_params[v % layout.pp] += sum(cost.params for cost in costs[a:e])
        seconds += max(profile.network.allreduce_seconds(memory_model.FLOAT_BYTES * params, layout.dp)
                       for params in stage_params)
    split = ",".join(str(start) for start, _ in ranges[1:])
    return Prediction(layout, seconds, batch / seconds, memory_of(ranges, profile.recomputes_forward), split)


@dataclass(frozen=True)
class Choice:
    chosen: Prediction
    ranked: Sequence[Prediction] = field(default_factory=tuple)  # every candidate, fastest first


def choose(specs: Sequence, input_shape: tuple, config: RunConfig, profile: Profile, world_size: int,
           memory_per_rank: int, allowed: Callable[[Layout], bool] = lambda layout: True) -> Choice:
    """The fastest ``allowed`` layout whose every rank fits ``memory_per_rank`` bytes;
    UsageError when none does."""
    candidates = [layout for layout in layouts(world_size, len(specs), config.global_batch_size(world_size))
                  if allowed(layout)]
    if not candidates:
        raise UsageError(f"--mode auto: no layout runs a batch of {config.global_batch_size(world_size)} on "
                         f"{world_size} ranks (each rank needs a sample); raise --batch-size")
    ranked = sorted((predict(layout, specs, input_shape, config, profile) for layout in candidates),
                    key=lambda found: -found.images_per_sec)
    ranked = [found if found.peak_memory <= memory_per_rank else
              replace(found, rejected=f"needs {mebibytes(found.peak_memory)} a rank, over "
                                      f"--memory-per-rank {mebibytes(memory_per_rank)}") for found in ranked]
    fitting = [found for found in ranked if not found.rejected]
    if not fitting:
        least = min(ranked, key=lambda found: found.peak_memory)
        raise UsageError(f"--mode auto: no layout fits --memory-per-rank {mebibytes(memory_per_rank)} on "
                         f"{world_size} ranks (the least, {least.layout.describe()}, needs "
                         f"{mebibytes(least.peak_memory)}); launch more ranks, lower --batch-size or raise "
                         "--memory-per-rank")
    return Choice(fitting[0], ranked)


def table(choice: Choice, limit: int = 0) -> list[str]:
    """The ranked candidates, one line each (the first ``limit``; 0: all), the choice marked."""
    shown = choice.ranked[:limit or None]
    width = max([34, *(len(found.layout.describe()) + 2 for found in shown)])  # the longest name, then a gap
    lines = [f"{'':2}{'layout':<{width}}{'img/s':>9}{'step ms':>10}{'memory/rank':>13}  note"]
    for found in shown:
        mark = "->" if found is choice.chosen else ""
        note = found.rejected or (f"cut {found.split}" if found.split else "")
        lines.append(f"{mark:2}{found.layout.describe():<{width}}{found.images_per_sec:9.1f}"
                     f"{1e3 * found.step_seconds:10.1f}{mebibytes(found.peak_memory):>13}  {note}")
    return lines
