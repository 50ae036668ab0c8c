"""The parallel plan as data: pp x dp layout, rank mapping and layer partition.

Pure functions, no MPI: unit-tested on their own. A rank's place is
``rank = replica * pp + stage``, so each pipeline occupies consecutive ranks
(one node under block mapping) and per-micro-batch point-to-point traffic
stays local, while the once-per-step allreduce between replicas of a stage
crosses nodes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate, combinations
from math import comb
from typing import TYPE_CHECKING

from common.core.config import Mode, Schedule
from common.core.errors import UsageError
from common.parallel import schedule

if TYPE_CHECKING:
    from common.core.config import RunConfig


@dataclass(frozen=True)
class ParallelPlan:
    mode: str
    pp: int = 1
    dp: int = 1
    servers: int = 0  # --mode ps: one parameter-server rank beside the dp workers
    chunks: int = 1   # model pieces per stage (--schedule interleaved: --virtual-stages)

    @property
    def virtual_stages(self):
        """Pieces the model is cut into: virtual stage ``chunk * pp + stage`` is the
        stage's chunk-th piece, so the pieces are dealt round the stages in order."""
        return self.pp * self.chunks

    def virtual_stage(self, stage, chunk):
        return chunk * self.pp + stage

    def place_of(self, virtual):
        """(stage, chunk) holding virtual stage ``virtual``."""
        return virtual % self.pp, virtual // self.pp

    @property
    def world_size(self):
        return self.pp * self.dp + self.servers

    @property
    def pipelined(self):
        return self.mode in (Mode.MODEL, Mode.HYBRID)

    def stage_of(self, rank):
        return rank % self.pp

    def replica_of(self, rank):
        return rank // self.pp

    def rank_of(self, stage, replica):
        return replica * self.pp + stage

    def stage_ranks(self, stage):
        """The replicas of one stage: the group that allreduces its gradients."""
        return [self.rank_of(stage, replica) for replica in range(self.dp)]



def make_plan(config: RunConfig, world_size: int) -> ParallelPlan:
    """The plan for ``config`` on ``world_size`` ranks; UsageError naming the fix."""
    if config.mode == Mode.DATA:
        if config.pp not in (0, 1):
            raise UsageError(f"--pp {config.pp} needs --mode model or --mode hybrid")
        return ParallelPlan("data", 1, world_size)
    if config.mode == Mode.PS:
        if world_size < 2:
            raise UsageError(f"--mode ps needs at least 2 ranks (rank 0 serves the parameters, the others "
                             f"compute gradients), got {world_size}; launch with -np 3 (1 server + 2 workers)")
        return ParallelPlan("ps", 1, world_size - 1, servers=1)
    pp = config.pp
    if pp < 1:
        raise UsageError(f"--mode {config.mode} needs --pp K (number of pipeline stages, >= 1)")
    if config.mode == Mode.MODEL:
        if world_size != pp:
            raise UsageError(f"--mode model --pp {pp} needs exactly {pp} ranks, got {world_size}; "
                             f"launch with -np {pp} or use --mode hybrid --pp {pp} --dp N")
        return ParallelPlan("model", pp, 1, chunks=chunks_per_stage(config))
    if config.dp:
        if pp * config.dp != world_size:
            raise UsageError(f"--mode hybrid --pp {pp} --dp {config.dp} needs {pp * config.dp} ranks but "
                             f"{world_size} were launched; launch with -np {pp * config.dp} or choose "
                             f"--pp/--dp whose product is {world_size}")
        dp = config.dp
    else:
        dp = world_size // pp
        if world_size % pp or dp < 1:
            raise UsageError(f"--mode hybrid --pp {pp} needs a multiple of {pp} ranks but {world_size} "
                             f"were launched; launch with -np {pp * max(dp, 1)} or -np {pp * (max(dp, 1) + 1)}, "
                             "or choose a --pp that divides the rank count")
    return ParallelPlan("hybrid", pp, dp, chunks=chunks_per_stage(config))


def forward_may_be_kept(schedule: Schedule, pp: int) -> bool:
    """Whether stages that recompute their forward at the backward could keep it instead.
    Not with one stage (the last computes its backward with the loss), nor under zb with a
    stage between the first and the last: that stage splits its backward, the split
    recomputes (it needs gradients inside the compiled forward, which a kept tape cannot
    give), and a cut charging the recompute to some stages but not others is not modelled."""
    return pp > 1 and not (schedule == Schedule.ZERO_BUBBLE and pp > 2)


def chunks_per_stage(config: RunConfig) -> int:
    return config.virtual_stages if config.schedule == Schedule.INTERLEAVED else 1


def check_stages(config: RunConfig, specs: Sequence) -> None:
    """Checks of --pp/--split against the model, before any rank is counted."""
    if config.mode in (Mode.DATA, Mode.PS):
        return
    pieces = config.pp * chunks_per_stage(config)
    if pieces > len(specs):
        if pieces == config.pp:
            raise UsageError(f"--pp {config.pp} is more stages than the model's {len(specs)} layers; "
                             f"use --pp <= {len(specs)}")
        raise UsageError(f"--pp {config.pp} x --virtual-stages {config.virtual_stages} is {pieces} pieces, more "
                         f"than the model's {len(specs)} layers; use fewer virtual stages or stages")
    if config.split:
        parse_split(config.split, len(specs), pieces)


def check_batch(config: RunConfig, plan: ParallelPlan) -> None:
    """The global batch must give every replica's micro-batches at least one sample. It need
    not divide evenly: the replicas' shares differ by at most one sample (data.rank_batches),
    and each share is cut into micro-batches that differ by at most one (np.array_split, as
    torchgpipe and torch.distributed.pipelining cut); the loss is still divided once by the
    global batch, so the step is the full-batch mean gradient either way."""
    global_batch = config.global_batch_size(plan.dp)
    if plan.pipelined:
        parts = plan.dp * config.microbatches
        if global_batch < parts:
            raise UsageError(f"global batch {global_batch} is smaller than {plan.dp} replica(s) x "
                             f"{config.microbatches} micro-batches; use --batch-size >= {parts} or fewer "
                             f"--microbatches")
    elif global_batch < plan.dp:
        raise UsageError(f"global batch {global_batch} is smaller than the {plan.dp} ranks sharing it; "
                         f"use --batch-size >= {plan.dp} or fewer ranks")


# --- Partition of layers into contiguous stages -----------------------------------

def parse_split(text: str, num_layers: int, stages: int) -> list[int]:
    """'2,4' -> stage boundaries [2, 4]: stage 0 = layers 0-1, stage 1 = 2-3, stage 2 = 4-."""
    try:
        bounds = [int(part) for part in text.split(",")]
    except ValueError:
        bounds = None
    if bounds is None or len(bounds) != stages - 1:
        raise UsageError(f"--split {text!r} must list {stages - 1} comma-separated layer indices "
                         f"for {stages} stages (--pp, times --virtual-stages when interleaved: the first layer of "
                         "each stage after the first)")
    if any(b <= a for a, b in zip([0] + bounds, bounds + [num_layers])):
        raise UsageError(f"--split {text!r} is out of range: indices must increase strictly within "
                         f"1..{num_layers - 1} (the model has {num_layers} layers, each stage needs one)")
    return bounds


def timed_costs(times: Sequence[tuple[float, float]], recomputes_forward: bool) -> tuple[list, list]:
    """--balance time: each layer's cost in a piece before the model's last, and in the last,
    from its measured (forward, backward) seconds. A framework whose pieces before the last
    run their forward again at the backward (TensorFlow's) pays the forward twice there."""
    last = [forward + backward for forward, backward in times]
    if not recomputes_forward:
        return last, last
    return [2 * forward + backward for forward, backward in times], last


def balanced_split(costs: Sequence[float], stages: int, last_costs: Sequence[float] | None = None) -> list[int]:
    """Boundaries cutting ``costs`` into ``stages`` contiguous non-empty parts
    that minimise the most expensive part (exact dynamic programme); the last part's
    layers cost ``last_costs`` where given."""
    count = len(costs)
    if stages > count:
        raise UsageError(f"--pp {stages} is more stages than the model's {count} layers; "
                         f"use --pp <= {count}")
    prefix, last_prefix = [0.0, *accumulate(costs)], [0.0, *accumulate(last_costs or costs)]
    infinity = float("inf")
    # best[k][i]: minimal max-stage cost of layers[:i] in k stages; cut[k][i]: where the last stage starts.
    best = [[infinity] * (count + 1) for _ in range(stages + 1)]
    cut = [[0] * (count + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for k in range(1, stages + 1):
        for i in range(k, count + 1):
            sums = last_prefix if k == stages else prefix
            for j in range(k - 1, i):
                value = max(best[k - 1][j], sums[i] - sums[j])
                if value < best[k][i]:
                    best[k][i], cut[k][i] = value, j
    bounds, end = [], count
    for k in range(stages, 1, -1):
        end = cut[k][end]
        bounds.append(end)
    return sorted(bounds)


def stage_ranges(bounds: Sequence[int], num_layers: int) -> list[tuple[int, int]]:
    """[(start, end)] layer index ranges of each stage."""
    edges = [0, *bounds, num_layers]
    return list(zip(edges[:-1], edges[1:]))


# Cuts whose step is modelled one by one when interleaved pieces are balanced; beyond,
# the pieces are balanced one by one instead.
INTERLEAVED_SEARCH_LIMIT = 20_000


def interleaved_split(costs: Sequence[float], stages: int, chunks: int, microbatches: int,
                      last_costs: Sequence[float] | None = None) -> list[int]:
    """Boundaries cutting ``costs`` into stages x chunks contiguous pieces, piece v on stage
    v % stages, whose interleaved step is shortest by common/parallel/schedule.step_time's model
    (each piece's forward its cost, its backward twice that, messages free), then whose
    largest piece is smallest. Neither equal pieces nor equal loads per rank suffice: equal
    pieces can leave one rank the heavy ones, equal loads can leave pieces so unequal that
    the ranks wait on each other. The model's last piece's layers cost ``last_costs`` where given."""
    pieces, count = stages * chunks, len(costs)
    if comb(count - 1, pieces - 1) > INTERLEAVED_SEARCH_LIMIT:
        return balanced_split(costs, pieces, last_costs)
    schedules = schedule.stage_schedules("interleaved", stages, microbatches, chunks)
    order = schedule.simulate(schedules)  # the same for every cut: only the costs change
    prefix, last_prefix = [0.0, *accumulate(costs)], [0.0, *accumulate(last_costs or costs)]
    best, best_bounds = None, None
    for bounds in combinations(range(1, count), pieces - 1):
        edges = (0, *bounds, count)
        piece_costs = [prefix[b] - prefix[a] for a, b in zip(edges[:-2], edges[1:-1])]
        piece_costs.append(last_prefix[count] - last_prefix[edges[-2]])
        score = (schedule.step_time(schedules, piece_costs, order=order), max(piece_costs))
        if best is None or score < best:
            best, best_bounds = score, list(bounds)
    assert best_bounds is not None, "fewer layers than pieces (check_stages refuses that layout)"
    return best_bounds


def partition(costs: Sequence[float], stages: int, split: str = "", chunks: int = 1,
              microbatches: int = 1, last_costs: Sequence[float] | None = None) -> list[tuple[int, int]]:
    """Layer ranges per piece (stages x chunks of them, piece v on stage v % stages): from
    --split if given, else balanced by ``costs`` (interleaved: for ``microbatches``), the
    model's last piece's layers by ``last_costs`` where given."""
    pieces = stages * chunks
    if pieces > len(costs):
        raise UsageError(f"--pp {stages} is more stages than the model's {len(costs)} layers; "
                         f"use --pp <= {len(costs)}")
    if split:
        bounds = parse_split(split, len(costs), pieces)
    elif chunks > 1:
        bounds = interleaved_split(costs, stages, chunks, microbatches, last_costs)
    else:
        bounds = balanced_split(costs, stages, last_costs)
    return stage_ranges(bounds, len(costs))
