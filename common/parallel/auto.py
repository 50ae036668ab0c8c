"""--mode auto at the start of a run: profile this hardware once (every rank measures,
rank 0's figures decide), weigh every layout (common/parallel/planner.py), and hand back
the run's configuration with the chosen layout, the same on every rank."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial

import numpy as np

from common.core import metrics
from common.core.config import Amp, Mode, RunConfig
from common.core.errors import UsageError, launcher_rank
from common.core.runner import StageFactory
from common.launch.cpu_budget import cpus_per_rank, read_cpu_share
from common.launch.environment import launcher_local_size, launcher_world_size
from common.launch.memory_budget import memory_per_rank, parse_size
from common.model import networks
from common.parallel import memory_model, planner
from common.parallel.memory_model import mebibytes

MESSAGE_REPEATS = 20
LARGE_MESSAGE = 4 << 20  # bytes: enough to see the bandwidth past the latency
ALLREDUCE_REPEATS = 5
ALLREDUCE_BYTES = 64 << 20  # the most of the gradients the profile allreduces (past it, bandwidth rules)


@dataclass(frozen=True)
class NodeRank:
    rank: int  # among the node's ranks
    size: int  # the node's ranks


@dataclass(frozen=True)
class Resolved:
    config: RunConfig                # the run's configuration, the chosen layout applied
    choice: planner.Choice
    memory_per_rank: int
    profile: planner.Profile


def resolve(config: RunConfig, specs, input_shape: tuple, stage_factory: StageFactory) -> Resolved:
    """The chosen layout for the ranks launched, or, --plan-ranks N alone, for N ranks on this node
    (messages costed by memory copies)."""
    launched = launcher_world_size()
    alone = bool(config.plan_ranks) and launched == 1
    world_size = config.plan_ranks if alone else launched
    if config.plan_ranks and not alone and config.plan_ranks != launched:
        raise UsageError(f"--plan-ranks {config.plan_ranks} plans for ranks other than the {launched} launched; "
                         "run the plan alone (one process), or drop --plan-ranks")
    comm = None if alone else _world(world_size)
    local_ranks = world_size if alone else launcher_local_size()
    gradient_bytes = memory_model.FLOAT_BYTES * networks.total_params(specs, input_shape)
    network = measure_network(comm, gradient_bytes) if comm is not None else copy_network()  # every rank
    # Every rank profiles, building the same models (Keras names its layers by a count, which
    # the ranks' Horovod broadcasts must share); rank 0's figures decide.
    threads = config.threads or cpus_per_rank(local_ranks)
    stage_factory.set_threads(threads, 0)
    meter = stage_factory.memory_meter(0)  # the framework warmed up, no model yet
    limit = parse_size(config.memory_per_rank) if config.memory_per_rank else \
        memory_per_rank(local_ranks, meter.device_bytes, meter.devices)
    profile = measure_profile(config, specs, input_shape, stage_factory, world_size, network, meter.baseline, comm)
    profile = replace(profile, allreduce_overlaps=meter.on_accelerator)
    if alone:  # one process profiled; the run's ranks will share the node's CPUs
        cpus = read_cpu_share(local_ranks).affinity
        slowdowns = tuple(max(1.0, busy * threads / cpus) for busy in range(1, local_ranks + 1))
        profile = replace(profile, contention=slowdowns[-1], busy_slowdowns=slowdowns)
    if comm is not None:
        profile = comm.bcast(profile, root=0)
    choice = planner.choose(specs, input_shape, config, profile, world_size, limit, allowed(config))
    split = choice.chosen.split
    resolved = Resolved(choice.chosen.layout.applied(config, split), choice, limit, profile)
    if comm is None or comm.rank == 0:
        metrics.log(f"--mode auto on {world_size} rank(s), at most {mebibytes(limit)} a rank: "
                    f"{choice.chosen.layout.describe()}, predicted {choice.chosen.images_per_sec:.1f} img/s and "
                    f"{mebibytes(choice.chosen.peak_memory)} a rank")
        for line in planner.table(choice, 0 if config.plan_only else 8):
            metrics.log(line)
    return resolved


def allowed(config: RunConfig):
    """Which layouts the other flags leave: those made for one whole model (--amp fp16,
    --adasum, --fp16-allreduce, --accumulation-steps) data parallel only, --sync-bn none
    without replicas, --recompute only those that recompute."""
    data_only = config.amp == Amp.FP16 or config.adasum or config.fp16_allreduce or config.accumulation_steps > 1

    def keeps(layout: planner.Layout) -> bool:
        if config.recompute and not layout.recompute:
            return False
        if data_only:
            return layout.mode == Mode.DATA
        return not (config.sync_bn and layout.mode == Mode.MODEL)
    return keeps


def _world(world_size: int):
    """MPI's world, which must be the launcher's (horovodrun over Gloo starts no MPI job)."""
    if world_size < 2:
        return None
    from mpi4py import MPI

    if MPI.COMM_WORLD.size != world_size:
        raise UsageError(f"--mode auto needs every rank in one MPI job, but MPI sees {MPI.COMM_WORLD.size} of the "
                         f"{world_size} launched; launch with mpirun -np {world_size} (or horovodrun over MPI)")
    return MPI.COMM_WORLD


def _alone() -> None:
    """No other rank to wait for."""


def measure_profile(config: RunConfig, specs, input_shape: tuple, stage_factory: StageFactory, world_size: int,
                    network: planner.Network, baseline: int, comm=None) -> planner.Profile:
    """Each layer timed at the smallest and the largest micro-batch the layouts use, and
    scaled to the whole model's step as rank 0 times it alone; the same step timed by 2, 3, ...
    and every rank of a node at once against that (the slowdowns, the last the contention),
    and its cost of --recompute; beside the ``baseline`` bytes held before any model. Each
    timing starts behind a barrier."""
    together = comm.Barrier if comm is not None else _alone
    node = _node(comm)
    batch = config.global_batch_size(world_size)
    largest = -(-batch // world_size)  # data parallel's share
    smallest = max(1, batch // (world_size * planner.MICROBATCH_FACTORS[-1]))
    # The memory first: a process whose allocator has seen less, as a run's has at its start.
    allocator = memory_model.allocator_excess(specs, input_shape, largest,
                                              stage_factory.measure_step_memory(specs, input_shape, largest))
    sizes = (min(smallest, largest), largest)
    timed, recompute, slowdowns = [], [], []
    for size in sizes:
        together()
        one_by_one = stage_factory.measure_layer_times(specs, input_shape, size)
        step = partial(stage_factory.measure_step_seconds, specs, input_shape, size)
        busy = [_first_at_once(comm, node.rank, count, step) for count in range(1, node.size + 1)]
        alone, whole = busy[0], busy[-1]
        together()
        recomputing = stage_factory.measure_step_seconds(specs, input_shape, size, recompute=True)
        timed.append(planner.calibrated(one_by_one, alone))
        recompute.append(planner.recompute_forwards(planner.calibrated(one_by_one, whole), whole, recomputing))
        slowdowns.append([seconds / alone for seconds in busy])
    small, large = timed
    busy_slowdowns = monotone([sum(ratios) / len(ratios) for ratios in zip(*slowdowns)])
    return planner.Profile(sizes, (small, large), network, stage_factory.recomputes_forward, baseline, allocator,
                           recompute_forwards=(recompute[0], recompute[1]), contention=busy_slowdowns[-1],
                           busy_slowdowns=busy_slowdowns)


def monotone(slowdowns: list[float]) -> tuple[float, ...]:
    """Measured slowdowns for 1, 2, ... ranks computing at once, as a run can see them: 1.0
    for one, and never less for more than for fewer (a quiet moment of the machine is not
    a property of the count)."""
    found = [1.0]
    for ratio in slowdowns[1:]:
        found.append(max(found[-1], ratio))
    return tuple(found)


def _node(comm) -> NodeRank:
    """This rank's place among the ranks of its node."""
    if comm is None:
        return NodeRank(0, 1)
    from mpi4py import MPI

    node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.rank)
    found = NodeRank(node.rank, node.size)
    node.Free()
    return found


def _first_at_once(comm, node_rank: int, count: int, measure: Callable[[], float]) -> float:
    """``measure()`` on the first ``count`` ranks of each node at once while the others wait,
    then on the others at once (they build the same models, which TensorFlow names by a
    count the ranks must share; their figures do not decide). Every rank leaves it behind
    a barrier."""
    if comm is None:
        return measure()
    comm.Barrier()
    found = measure() if node_rank < count else None
    comm.Barrier()
    if found is None:
        found = measure()
    comm.Barrier()
    return found


def measure_network(comm, gradient_bytes: int) -> planner.Network:
    """Collective: ranks 0 and 1 pass a small and a large message back and forth while the
    others wait; then every rank allreduces ``gradient_bytes`` (at most ALLREDUCE_BYTES),
    as data parallel will; every rank learns the figures."""
    small, large = np.zeros(1, np.float32), np.zeros(LARGE_MESSAGE // 4, np.float32)
    found = None
    if comm.rank in (0, 1):
        other = 1 - comm.rank
        seconds = []
        for buffer in (small, large):
            start = time.perf_counter()
            for _ in range(MESSAGE_REPEATS):
                if comm.rank == 0:
                    comm.Send(buffer, dest=other)
                    comm.Recv(buffer, source=other)
                else:
                    comm.Recv(buffer, source=other)
                    comm.Send(buffer, dest=other)
            seconds.append((time.perf_counter() - start) / (2 * MESSAGE_REPEATS))
        latency = seconds[0]
        found = planner.Network(latency, LARGE_MESSAGE / max(seconds[1] - latency, 1e-9))
    found = comm.bcast(found, root=0)
    size = min(gradient_bytes, ALLREDUCE_BYTES) // 4 * 4
    gradients, reduced = np.zeros(size // 4, np.float32), np.empty(size // 4, np.float32)
    comm.Allreduce(gradients, reduced)  # warms up the collective's buffers
    comm.Barrier()
    start = time.perf_counter()
    for _ in range(ALLREDUCE_REPEATS):
        comm.Allreduce(gradients, reduced)
    timed = found.with_allreduce_timed(size, comm.size, (time.perf_counter() - start) / ALLREDUCE_REPEATS)
    return comm.bcast(timed, root=0)


def copy_network() -> planner.Network:
    """Alone (--plan-only): ranks on one node pass messages through shared memory, a copy in
    and a copy out, so half the speed of one copy stands in for the bandwidth."""
    source, target = np.ones(LARGE_MESSAGE // 4, np.float32), np.empty(LARGE_MESSAGE // 4, np.float32)
    best = float("inf")
    for _ in range(MESSAGE_REPEATS):
        start = time.perf_counter()
        np.copyto(target, source)
        best = min(best, time.perf_counter() - start)
    return planner.Network(latency=20e-6, bandwidth=LARGE_MESSAGE / (2 * best))


def record(resolved: Resolved) -> dict:
    """The choice for the run summary: each layout weighed, its prediction, why one was refused."""
    def entry(found: planner.Prediction) -> dict:
        return {"layout": found.layout.describe(), "flags": found.layout.flags(found.split),
                "predicted_images_per_sec": found.images_per_sec, "predicted_step_seconds": found.step_seconds,
                "predicted_memory_bytes": list(found.memory), "rejected": found.rejected}
    return {"memory_per_rank_bytes": resolved.memory_per_rank, "allocator_bytes": resolved.profile.allocator,
            "baseline_bytes": resolved.profile.baseline,
            "profiled_samples": list(resolved.profile.samples),
            "layer_seconds": [[list(layer) for layer in times] for times in resolved.profile.times],
            "recomputes_forward": resolved.profile.recomputes_forward,
            "contention": resolved.profile.contention,
            "busy_slowdowns": list(resolved.profile.busy_slowdowns),
            "recompute_forwards": list(resolved.profile.recompute_forwards),
            "allreduce_overlaps": resolved.profile.allreduce_overlaps,
            "network": {"latency_seconds": resolved.profile.network.latency,
                        "bandwidth_bytes_per_second": resolved.profile.network.bandwidth,
                        "ring_step_latency_seconds": resolved.profile.network.ring_step_latency},
            "chosen": entry(resolved.choice.chosen),
            "candidates": [entry(found) for found in resolved.choice.ranked]}


def write_plan(config: RunConfig, resolved: Resolved) -> None:
    """--plan-only with --summary-file FILE: the choice, as the run summary would record it."""
    if config.summary_file and launcher_rank() == 0:
        with open(config.summary_file, "w") as handle:
            json.dump({"layout_choice": record(resolved)}, handle, indent=1)
