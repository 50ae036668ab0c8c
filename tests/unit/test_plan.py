import itertools

import pytest

from common.core.config import RunConfig, Schedule
from common.core.errors import UsageError
from common.model import networks
from common.parallel import schedule
from common.parallel.plan import (
    ParallelPlan,
    balanced_split,
    check_batch,
    check_stages,
    forward_may_be_kept,
    make_plan,
    partition,
    stage_ranges,
    timed_costs,
)


def test_rank_mapping_is_a_grid():
    plan = ParallelPlan("hybrid", pp=3, dp=2)
    assert [(plan.stage_of(r), plan.replica_of(r)) for r in range(6)] == [
        (0, 0), (1, 0), (2, 0), (0, 1), (1, 1), (2, 1)]
    assert all(plan.rank_of(plan.stage_of(r), plan.replica_of(r)) == r for r in range(6))
    assert plan.stage_ranks(1) == [1, 4] and [plan.rank_of(stage, 1) for stage in range(3)] == [3, 4, 5]


def test_make_plan_per_mode():
    assert make_plan(RunConfig(), 4) == ParallelPlan("data", 1, 4)
    assert make_plan(RunConfig(mode="model", pp=3), 3) == ParallelPlan("model", 3, 1)
    assert make_plan(RunConfig(mode="hybrid", pp=2, dp=2), 4) == ParallelPlan("hybrid", 2, 2)
    assert make_plan(RunConfig(mode="hybrid", pp=2), 6) == ParallelPlan("hybrid", 2, 3)
    ps = make_plan(RunConfig(mode="ps"), 3)
    assert ps == ParallelPlan("ps", 1, 2, servers=1) and ps.world_size == 3 and not ps.pipelined


def test_interleaved_deals_the_pieces_round_the_stages():
    plan = make_plan(RunConfig(mode="hybrid", pp=2, dp=2, schedule="interleaved", virtual_stages=3), 4)
    assert plan == ParallelPlan("hybrid", 2, 2, chunks=3) and plan.virtual_stages == 6
    # Pieces 0, 2, 4 on stage 0 and 1, 3, 5 on stage 1: a micro-batch goes round three times.
    assert [plan.place_of(v) for v in range(6)] == [(0, 0), (1, 0), (0, 1), (1, 1), (0, 2), (1, 2)]
    assert all(plan.virtual_stage(*plan.place_of(v)) == v for v in range(6))
    assert make_plan(RunConfig(mode="model", pp=2, virtual_stages=3), 2).chunks == 1  # 1f1b: one piece


def test_interleaved_pieces_are_cut_for_the_shortest_modelled_step():
    costs = [1, 8, 5, 4, 2, 6, 1]
    ranges = partition(costs, 2, chunks=2, microbatches=4)
    assert len(ranges) == 4 and all(b > a for a, b in ranges)
    schedules = schedule.stage_schedules("interleaved", 2, 4, 2)

    def modelled(cut):
        return schedule.step_time(schedules, [sum(costs[a:b]) for a, b in cut])
    every_cut = [stage_ranges(list(bounds), len(costs)) for bounds in itertools.combinations(range(1, 7), 3)]
    assert modelled(ranges) == min(modelled(cut) for cut in every_cut)
    # Balancing the pieces alone (1 | 8 | 5 4 | 2 6 1: loads 10 and 17) makes the step 13% longer.
    assert ranges == [(0, 2), (2, 3), (3, 5), (5, 7)] and modelled(ranges) == 186
    assert modelled(stage_ranges(balanced_split(costs, 4), len(costs))) == 210


def test_interleaved_pieces_must_fit_the_model():
    specs = networks.model_specs("cnn", (1, 8, 8), 10)
    check_stages(RunConfig(mode="model", pp=2, schedule="interleaved", virtual_stages=2), specs)
    too_many = len(specs) // 2 + 1
    with pytest.raises(UsageError, match=f"--pp 2 x --virtual-stages {too_many} is {2 * too_many} pieces"):
        check_stages(RunConfig(mode="model", pp=2, schedule="interleaved", virtual_stages=too_many), specs)
    with pytest.raises(UsageError, match="must list 3 comma-separated layer indices for 4 stages"):
        check_stages(RunConfig(mode="model", pp=2, schedule="interleaved", split="2"), specs)


@pytest.mark.parametrize("config,world,message", [
    (RunConfig(mode="model", pp=2), 3, "needs exactly 2 ranks, got 3; launch with -np 2"),
    (RunConfig(mode="hybrid", pp=2, dp=2), 6, "needs 4 ranks but 6 were launched; launch with -np 4"),
    (RunConfig(mode="hybrid", pp=2), 3, "multiple of 2 ranks but 3 were launched; launch with -np 2 or -np 4"),
    (RunConfig(mode="hybrid", pp=4), 2, "multiple of 4 ranks but 2 were launched; launch with -np 4 or -np 8"),
    (RunConfig(mode="data", pp=2), 2, "needs --mode model"),
    (RunConfig(mode="ps"), 1, "--mode ps needs at least 2 ranks .* launch with -np 3"),
])
def test_impossible_layouts_name_the_fix(config, world, message):
    with pytest.raises(UsageError, match=message):
        make_plan(config, world)


def test_batch_must_give_every_microbatch_a_sample():
    check_batch(RunConfig(mode="hybrid", pp=2, dp=2, batch_size=64, microbatches=4), ParallelPlan("hybrid", 2, 2))
    # Uneven: shares 31/30, micro-batches of 8 and 7 samples.
    check_batch(RunConfig(mode="hybrid", pp=2, dp=2, batch_size=61, microbatches=4), ParallelPlan("hybrid", 2, 2))
    check_batch(RunConfig(mode="hybrid", pp=2, dp=2, batch_size=8, microbatches=4), ParallelPlan("hybrid", 2, 2))
    with pytest.raises(UsageError, match="global batch 7 is smaller than 2 replica.* x 4 micro-batches.*>= 8"):
        check_batch(RunConfig(mode="hybrid", pp=2, batch_size=7, microbatches=4), ParallelPlan("hybrid", 2, 2))


def test_balanced_split_minimises_the_largest_stage():
    assert balanced_split([1, 1, 1, 1], 2) == [2]
    assert balanced_split([10, 1, 1, 1, 1], 2) == [1]
    assert balanced_split([1, 2, 3, 4, 5, 6, 7, 8, 9], 3) == [5, 7]  # 15 | 13 | 17
    costs = [5, 1, 8, 2, 2, 7, 3]
    for stages in range(1, len(costs) + 1):
        best = max(sum(costs[a:b]) for a, b in stage_ranges(balanced_split(costs, stages), len(costs)))
        brute = min(max(sum(costs[a:b]) for a, b in stage_ranges(list(cut), len(costs)))
                    for cut in __import__("itertools").combinations(range(1, len(costs)), stages - 1))
        assert best == brute


def test_time_balance_charges_the_recomputed_forward_to_the_pieces_before_the_last():
    """TensorFlow's pieces before the model's last run their forward again at the backward:
    there a layer costs 2 forwards + a backward, in the last piece 1 + 1."""
    times = [(1.0, 2.0), (4.0, 2.0), (1.0, 2.0), (1.0, 2.0)]
    assert timed_costs(times, recomputes_forward=False) == ([3.0, 6.0, 3.0, 3.0],) * 2
    charged, last = timed_costs(times, recomputes_forward=True)
    assert charged == [4.0, 10.0, 4.0, 4.0] and last == [3.0, 6.0, 3.0, 3.0]
    # Without the charge the cut is 3+6 | 3+3 = 9 | 6; charged, the first piece would cost
    # 14 against the last's 6, so the cut moves to 4 | 6+3+3 = 12.
    assert partition(last, 2) == [(0, 2), (2, 4)]
    assert partition(charged, 2, last_costs=last) == [(0, 1), (1, 4)]
    # Interleaved pieces take the same charge: only the model's last piece is spared it.
    assert partition(charged, 2, chunks=2, microbatches=2, last_costs=last) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    many = [(1.0, 2.0)] * 3 + [(0.5, 1.0)] * 3
    charged, last = timed_costs(many, True)
    for stages in (2, 3):
        best = max(sum((last if b == len(many) else charged)[a:b]) for a, b in partition(charged, stages,
                                                                                       last_costs=last))
        brute = min(max(sum((last if b == len(many) else charged)[a:b]) for a, b in
                        stage_ranges(list(cut), len(many)))
                    for cut in itertools.combinations(range(1, len(many)), stages - 1))
        assert best == brute


def test_partition_of_the_seed_cnn_by_flops():
    specs = networks.model_specs("cnn", (3, 32, 32), 10)
    flops = [cost.flops for cost in networks.layer_costs(specs, (3, 32, 32))]
    ranges = partition(flops, 2)
    assert ranges[0][0] == 0 and ranges[-1][1] == len(specs)
    assert all(a < b for a, b in ranges) and ranges[0][1] == ranges[1][0]


@pytest.mark.parametrize("split,stages,message", [
    ("2,9", 3, "out of range"), ("3,3", 3, "out of range"), ("0", 2, "out of range"),
    ("2", 3, "must list 2"), ("a,b", 3, "must list 2"),
])
def test_explicit_split_is_checked(split, stages, message):
    with pytest.raises(UsageError, match=message):
        partition([1] * 7, stages, split)


def test_explicit_split_and_too_many_stages():
    assert partition([1] * 7, 3, "2,4") == [(0, 2), (2, 4), (4, 7)]
    with pytest.raises(UsageError, match="--pp 8 is more stages than the model's 7 layers"):
        partition([1] * 7, 8)


def test_balance_by_measured_time_cuts_valid_stages():
    from train_torch.stage import TorchStage

    specs = networks.model_specs("resnet", (1, 8, 8), 10)
    times = TorchStage.measure_layer_times(specs, (1, 8, 8), batch_size=8, repeats=1)
    assert len(times) == len(specs) and all(forward > 0 and backward > 0 for forward, backward in times)
    ranges = partition([forward + backward for forward, backward in times], 3)
    assert [a for a, _ in ranges] == [0, ranges[0][1], ranges[1][1]] and ranges[-1][1] == len(specs)


def test_gradient_buckets_follow_the_backward_and_cover_every_gradient_once():
    from common.parallel.data_parallel import gradient_buckets

    sizes = [100, 5, 300, 5, 50, 5, 400, 5]  # kernel, bias, ... in the model's order
    buckets = gradient_buckets(sizes, limit=200)
    assert buckets == [[7, 6], [5, 4, 3, 2], [1, 0]]  # last layer first; each closes at the limit
    assert sorted(index for bucket in buckets for index in bucket) == list(range(len(sizes)))
    assert gradient_buckets(sizes, limit=10**9) == [list(reversed(range(len(sizes))))]
    assert gradient_buckets([], limit=1) == []


def test_the_forward_may_be_kept_except_where_a_split_backward_recomputes_it():
    for kind in Schedule:
        assert not forward_may_be_kept(kind, 1)
        assert forward_may_be_kept(kind, 2)  # zb: the first stage runs whole backwards, the last has the loss
        assert forward_may_be_kept(kind, 3) == (kind != Schedule.ZERO_BUBBLE)
