"""--mode auto's planner: the layouts it weighs, its time model, and its choice (pure arithmetic)."""

from dataclasses import replace

import pytest

from common.core.config import Mode, Schedule, parse_config
from common.core.errors import UsageError
from common.model import networks
from common.parallel import auto, schedule
from common.parallel.planner import (
    Layout,
    Network,
    Profile,
    calibrated,
    choose,
    layouts,
    predict,
    recompute_forwards,
    table,
)

SHAPE = (3, 32, 32)
SPECS = networks.model_specs("resnet8", SHAPE, 10)
FREE = Network(latency=0.0, bandwidth=float("inf"))


def profile(network=FREE, per_sample=1e-3, per_call=0.0, recomputes=False, allocator=0):
    """Every layer alike: a forward of per_call + per_sample x samples, the backward twice that."""
    def at(samples):
        forward = per_call + per_sample * samples
        return [(forward, 2 * forward)] * len(SPECS)
    return Profile((2, 32), (at(2), at(32)), network, recomputes, baseline=100 << 20, allocator=allocator)


def config(*flags):
    return parse_config(["--mode", "auto", "--batch-size", "32", *flags])


def test_the_layouts_cover_data_model_and_hybrid_within_the_batch_and_the_layers():
    found = layouts(4, len(SPECS), 32)
    assert Layout(Mode.DATA, 1, 4) in found
    assert {(layout.mode, layout.pp, layout.dp) for layout in found} == {
        (Mode.DATA, 1, 4), (Mode.HYBRID, 2, 2), (Mode.MODEL, 4, 1)}
    for layout in found:
        assert layout.pp * layout.dp == 4
        assert layout.dp * layout.microbatches <= 32 and layout.microbatches % layout.pp == 0 or not layout.pipelined
        assert layout.pp * layout.chunks <= len(SPECS)
    assert {layout.schedule for layout in found if layout.pipelined} == set(Schedule)
    assert not [layout for layout in layouts(4, 6, 32) if layout.chunks > 1 and layout.pp == 4]  # 8 pieces > 6
    assert layouts(3, len(SPECS), 2) == []  # a sample for every rank: none has one


def test_layer_times_lie_on_the_line_through_the_two_timed_sizes():
    found = profile(per_sample=1e-3, per_call=5e-3)
    assert found.layer_times(2)[0] == pytest.approx((7e-3, 14e-3))
    assert found.layer_times(32)[0] == pytest.approx((37e-3, 74e-3))
    assert found.layer_times(17)[0] == pytest.approx((22e-3, 44e-3))


def test_ranks_that_share_cpus_compute_slower_bubbles_included_without_slowdowns_per_count():
    """A profile that measured only the contention (all ranks at once) slows every moment
    of a schedule by it, bubbles included."""
    alone, crowded = profile(per_sample=1e-3), replace(profile(per_sample=1e-3), contention=2.0)
    data = Layout(Mode.DATA, 1, 2)
    assert predict(data, SPECS, SHAPE, config(), crowded).step_seconds == \
        pytest.approx(2 * predict(data, SPECS, SHAPE, config(), alone).step_seconds)
    pipeline = Layout(Mode.MODEL, 2, 1, 2, Schedule.GPIPE)  # a bubble of a third of the step
    per_rank = 2 * sum(f + b for f, b in alone.layer_times(16)) / 2
    scheduled = predict(pipeline, SPECS, SHAPE, config(), alone).step_seconds
    assert 1.3 * per_rank < scheduled < 2 * per_rank
    for contention in (1.3, 2.0):
        shared = replace(alone, contention=contention)
        assert predict(pipeline, SPECS, SHAPE, config(), shared).step_seconds == pytest.approx(contention * scheduled)


def test_a_slowdown_per_count_lies_on_the_line_between_the_counts_measured():
    measured = replace(profile(), contention=2.0, busy_slowdowns=(1.0, 1.2, 1.6, 2.0))
    assert [measured.slowdown_while(share) for share in (0.0, 0.25, 0.5, 0.625, 0.75, 1.0)] == \
        pytest.approx([1.0, 1.0, 1.2, 1.4, 1.6, 2.0])
    assert replace(measured, busy_slowdowns=()).slowdown_while(0.25) == 2.0


def test_a_pipelines_bubbles_run_faster_than_its_crowded_moments():
    """Ranks slowed only while every one computes: a pipeline, whose fill and drain leave
    some waiting, loses less than the contention; data parallel, every rank computing
    throughout, loses all of it; slowed alike at every count, the pipeline loses it all."""
    alone = profile(per_sample=1e-3)
    only_crowded = replace(alone, contention=2.0, busy_slowdowns=(1.0, 1.0, 1.0, 2.0))
    for layout in (Layout(Mode.MODEL, 4, 1, 8, Schedule.ONE_F_ONE_B), Layout(Mode.HYBRID, 2, 2, 4, Schedule.GPIPE)):
        scheduled = predict(layout, SPECS, SHAPE, config(), alone).step_seconds
        assert scheduled < predict(layout, SPECS, SHAPE, config(), only_crowded).step_seconds < 2 * scheduled
        alike = replace(alone, contention=1.5, busy_slowdowns=(1.5,) * 4)
        assert predict(layout, SPECS, SHAPE, config(), alike).step_seconds == pytest.approx(1.5 * scheduled, rel=1e-3)
    data = Layout(Mode.DATA, 1, 4)
    assert predict(data, SPECS, SHAPE, config(), only_crowded).step_seconds == \
        pytest.approx(2 * predict(data, SPECS, SHAPE, config(), alone).step_seconds)


def test_layer_times_are_scaled_to_the_whole_step_timed_as_one_call():
    one_by_one = [(1e-3, 2e-3), (3e-3, 4e-3)]  # 10 ms in all
    found = calibrated(one_by_one, 5e-3)
    assert [t for layer in found for t in layer] == pytest.approx([0.5e-3, 1e-3, 1.5e-3, 2e-3])
    assert sum(f + b for f, b in found) == pytest.approx(5e-3)
    assert calibrated(one_by_one, 0.0) == one_by_one  # nothing timed: left as they are


def test_a_ring_allreduce_moves_twice_the_buffer_less_a_share():
    network = Network(latency=1e-5, bandwidth=1e9)
    assert network.allreduce_seconds(8e6, 1) == 0
    assert network.allreduce_seconds(8e6, 4) == pytest.approx(6 * (1e-5 + 2e6 / 1e9))


def test_a_timed_allreduce_sets_the_ring_steps_latency_and_predicts_itself():
    network = Network(latency=1e-5, bandwidth=1e9)
    timed = network.with_allreduce_timed(8e6, 4, 30e-3)
    assert timed.ring_step_latency == pytest.approx(30e-3 / 6 - 2e6 / 1e9)
    assert timed.allreduce_seconds(8e6, 4) == pytest.approx(30e-3)
    assert timed.allreduce_seconds(8e6, 2) == pytest.approx(2 * (timed.ring_step_latency + 4e6 / 1e9))
    assert timed.message_seconds(1e6) == network.message_seconds(1e6)  # point-to-point as measured
    assert network.with_allreduce_timed(8e6, 4, 0.0).ring_step_latency == network.latency  # never below
    assert network.with_allreduce_timed(8e6, 1, 1.0) == network


def test_on_a_cpu_data_parallel_pays_the_allreduce_after_the_backward():
    layout, slow = Layout(Mode.DATA, 1, 2), Network(0.0, 1e6)
    gradients = 4 * networks.total_params(SPECS, SHAPE)
    found = predict(layout, SPECS, SHAPE, config(), replace(profile(slow), allreduce_overlaps=False))
    assert found.step_seconds == pytest.approx(3 * len(SPECS) * 16e-3 + slow.allreduce_seconds(gradients, 2))


def test_data_parallel_pays_the_allreduce_only_beyond_the_backward():
    layout = Layout(Mode.DATA, 1, 2)
    free = predict(layout, SPECS, SHAPE, config(), profile())
    assert free.step_seconds == pytest.approx(3 * len(SPECS) * 16e-3)  # forward and backward of 16 samples
    slow = predict(layout, SPECS, SHAPE, config(), profile(Network(0.0, 1e6)))
    gradients = 4 * networks.total_params(SPECS, SHAPE)
    assert slow.step_seconds == pytest.approx(len(SPECS) * 16e-3 + Network(0.0, 1e6).allreduce_seconds(gradients, 2))
    assert slow.images_per_sec == pytest.approx(32 / slow.step_seconds)


def test_a_pipelines_step_is_its_schedules_with_messages_on_top():
    layout = Layout(Mode.MODEL, 2, 1, 4, Schedule.GPIPE)
    free = predict(layout, SPECS, SHAPE, config(), profile())
    pieces = [sum(1e-3 * 8 for _ in range(a, b)) for a, b in [(0, int(free.split)), (int(free.split), len(SPECS))]]
    assert free.step_seconds == pytest.approx(schedule.step_time(schedule.stage_schedules("gpipe", 2, 4), pieces))
    delayed = predict(layout, SPECS, SHAPE, config(), profile(Network(1e-2, float("inf"))))
    assert delayed.step_seconds >= free.step_seconds + 2 * 1e-2  # at least one message each way on the path


def test_a_recomputing_framework_pays_a_forward_more_before_the_last_piece():
    layout = Layout(Mode.MODEL, 2, 1, 4, Schedule.ONE_F_ONE_B)
    keeping = predict(layout, SPECS, SHAPE, config(), profile())
    recomputing = predict(layout, SPECS, SHAPE, config(), profile(recomputes=True))
    assert recomputing.step_seconds > keeping.step_seconds
    assert recomputing.memory[0] < keeping.memory[0]  # the first stage keeps only its inputs


def test_many_small_microbatches_lose_to_per_call_costs():
    calls = profile(per_call=20e-3)
    found = {m: predict(Layout(Mode.MODEL, 2, 1, m, Schedule.ONE_F_ONE_B), SPECS, SHAPE, config(), calls)
             for m in (2, 16)}
    assert found[2].images_per_sec > found[16].images_per_sec


def test_the_choice_is_the_fastest_layout_that_fits():
    everything = choose(SPECS, SHAPE, config(), profile(), 2, 1 << 40)
    assert everything.chosen == everything.ranked[0]
    assert [p.images_per_sec for p in everything.ranked] == sorted((p.images_per_sec for p in everything.ranked),
                                                                    reverse=True)
    data = next(p for p in everything.ranked if p.layout.mode == Mode.DATA)
    smallest = min(p.peak_memory for p in everything.ranked)
    assert data.peak_memory > smallest
    tight = choose(SPECS, SHAPE, config(), profile(), 2, data.peak_memory - 1)
    assert tight.chosen.layout.pipelined and tight.chosen.peak_memory < data.peak_memory
    refused = next(p for p in tight.ranked if p.layout == data.layout)
    assert "over --memory-per-rank" in refused.rejected
    assert any(line.startswith("->") for line in table(tight))
    with pytest.raises(UsageError, match="no layout fits --memory-per-rank"):
        choose(SPECS, SHAPE, config(), profile(), 2, smallest - 1)


def test_the_allocators_share_adds_to_every_layout():
    plain, held = profile(), profile(allocator=50 << 20)
    for layout in (Layout(Mode.DATA, 1, 2), Layout(Mode.MODEL, 2, 1, 4)):
        assert [b - a for a, b in zip(predict(layout, SPECS, SHAPE, config(), plain).memory,
                                      predict(layout, SPECS, SHAPE, config(), held).memory)] == [50 << 20] * layout.pp


def test_flags_made_for_one_whole_model_leave_data_parallel_only():
    keeps = auto.allowed(config("--amp", "fp16"))
    assert [layout.mode for layout in layouts(2, len(SPECS), 32) if keeps(layout)] == [Mode.DATA, Mode.DATA]
    synced = auto.allowed(config("--sync-bn"))
    assert {layout.mode for layout in layouts(4, len(SPECS), 32) if synced(layout)} == {Mode.DATA, Mode.HYBRID}
    recomputing = auto.allowed(config("--recompute"))
    assert all(layout.recompute for layout in layouts(2, len(SPECS), 32) if recomputing(layout))


def test_the_recompute_costs_what_the_profile_measured_it_to_cost_at_each_size():
    times = [(1e-3, 2e-3), (3e-3, 4e-3)]  # a 4 ms forward, a 10 ms step
    assert recompute_forwards(times, 10e-3, 18e-3) == pytest.approx(2.0)  # 8 ms more: two forwards
    assert recompute_forwards(times, 10e-3, 9e-3) == 0.0  # faster with it: noise, nothing charged
    measured = replace(profile(per_sample=1e-3), recompute_forwards=(3.0, 1.0))  # sizes 2 and 32
    for samples, forwards in ((2, 3.0), (17, 2.0), (32, 1.0), (64, 1.0)):
        plain, again = measured.layer_times(samples), measured.layer_times(samples, recompute=True)
        assert [f for f, _ in again] == pytest.approx([f for f, _ in plain])
        assert [b for _, b in again] == pytest.approx([b + forwards * f for f, b in plain])
    layout = Layout(Mode.MODEL, 2, 1, 8, Schedule.GPIPE, recompute=True)  # micro-batches of 4
    assert predict(layout, SPECS, SHAPE, config(), measured).step_seconds > \
        predict(layout, SPECS, SHAPE, config(), profile(per_sample=1e-3)).step_seconds


def test_recompute_trades_a_forward_for_activation_memory():
    for layout in (Layout(Mode.DATA, 1, 2), Layout(Mode.MODEL, 2, 1, 4, Schedule.GPIPE)):
        keeping = predict(layout, SPECS, SHAPE, config(), profile())
        again = predict(replace(layout, recompute=True), SPECS, SHAPE, config(), profile())
        assert again.peak_memory < keeping.peak_memory and again.step_seconds > keeping.step_seconds
    data = predict(Layout(Mode.DATA, 1, 2, recompute=True), SPECS, SHAPE, config(), profile())
    assert data.step_seconds == pytest.approx(4 * len(SPECS) * 16e-3)  # a forward more than 3 x
    assert not [layout for layout in layouts(2, len(SPECS), 32) if layout.recompute
                and layout.schedule == Schedule.ZERO_BUBBLE and layout.pipelined]


@pytest.mark.parametrize("layout", layouts(4, len(SPECS), 32)[::5])
def test_a_layout_runs_as_its_own_flags_say(layout):
    found = predict(layout, SPECS, SHAPE, config(), profile())
    applied = layout.applied(config(), found.split)
    by_hand = parse_config(["--batch-size", "32", *layout.flags(found.split)])
    for name in ("mode", "pp", "dp", "microbatches", "split"):
        assert getattr(applied, name) == getattr(by_hand, name), name
    if layout.pipelined:
        assert applied.schedule == by_hand.schedule and applied.mode == layout.mode


def test_slowdowns_measured_per_count_start_at_one_and_never_fall_with_more_ranks():
    assert auto.monotone([1.0, 1.3, 1.2, 2.0]) == (1.0, 1.3, 1.3, 2.0)
    assert auto.monotone([1.02, 0.9]) == (1.0, 1.0)
