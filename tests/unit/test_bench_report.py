"""The benchmark report's arithmetic, on made-up numbers (benchmarks/report.py is pure)."""

import pytest

from benchmarks import pairing, report


def case(name, framework, median, ranks=2):
    return {"name": name, "framework": framework, "ranks": ranks, "oversubscribed": False,
            "median": median, "min": median, "max": median}


RESULTS = {"machine": {"date": "today", "host": "h", "cores": 2, "cpu": "", "python": "3"},
           "settings": {"model": "seed CNN", "image_shape": "3,32,32", "global_batch": 128, "threads_per_rank": 1,
                        "windows": 6, "steps_per_window": 10},
           "cases": [case("data np1", "torch", 1000, 1), case("data np2", "torch", 1800),
                     case("DDP np2 (torchrun, gloo)", "torch (peer)", 1500),
                     case("model pp2, gpipe M4", "torch", 1200)],
           "allreduce": {}}


def test_bubble_bound():
    assert report.pipeline_bound(1) == 0.5 and report.pipeline_bound(4) == pytest.approx(0.8)
    assert report.pipeline_bound(8, stages=4) == pytest.approx(8 / 11)


def test_the_cut_bound_prices_the_last_piece_by_its_own_costs():
    """A run's summary: two pieces of 2 layers; the first piece's layers were charged a
    recomputed forward (partition_costs), the last's were not (last_piece_costs)."""
    summary = {"pp": 2, "schedule": "1f1b", "microbatches": 4, "virtual_stages": 1,
               "layer_ranges": [[0, 2], [2, 4]], "partition_costs": [4.0, 4.0, 4.0, 4.0]}
    assert report.cut_bound(summary) == pytest.approx(report.pipeline_bound(4))  # equal pieces
    lighter_last = {**summary, "last_piece_costs": [3.0, 3.0, 3.0, 3.0]}
    assert report.cut_bound(lighter_last) == pytest.approx(
        report.partition_bound("1f1b", 2, 4, [8.0, 6.0]))
    assert report.cut_bound(lighter_last) < report.cut_bound(summary)
    assert report.cut_bound({**summary, "pp": 1}) is None


def test_derived_ratios():
    rows = dict(report.derived(RESULTS))
    assert rows["scaling efficiency: data np2 / (2 x data np1)"]["torch"] == pytest.approx(0.9)
    assert rows["Horovod data np2, shipped defaults / peer (DDP; MultiWorkerMirrored)"]["torch"] == \
        pytest.approx(1.2)
    assert rows["pipeline efficiency gpipe M4: pp2 / (2 x np1) (bound 0.80)"]["torch"] == pytest.approx(0.6)
    assert rows["scaling efficiency: data np2 / (2 x data np1)"]["tf"] is None


def test_markdown_lists_every_case_and_skips_empty_ratios():
    table = report.markdown(RESULTS)
    assert table.count("| torch |") == 3 and "| DDP np2 (torchrun, gloo) | torch (peer) | 2 | 1,500 |" in table
    assert "parameter server" not in table  # no PS case measured, no PS row


def test_zoo_cases_get_their_own_table_and_ratios():
    zoo = [{**case(name, framework, median, ranks), "group": "zoo", "workload": "resnet18 3x32x32, batch 32"}
           for name, framework, median, ranks in [
               ("resnet18 32px data np1", "torch", 10.0, 1), ("resnet18 32px data np2", "torch", 16.0, 2),
               ("resnet18 32px data np2 --sync-bn", "torch", 12.0, 2),
               ("resnet18 32px data np1 --amp bf16", "torch", 25.0, 1),
               ("vgg16 32px data np2", "tf", 4.0, 2), ("vgg16 32px model pp2, 1f1b M4", "tf", 6.0, 2)]]
    results = {**RESULTS, "cases": RESULTS["cases"] + zoo}
    rows = dict(report.zoo_derived(results))
    assert rows["ResNet-18 32px scaling efficiency: np2 / (2 x np1)"]["torch"] == pytest.approx(0.8)
    assert rows["--sync-bn cost: np2 with / np2 without"]["torch"] == pytest.approx(0.75)
    assert rows["--amp bf16 gain: np1 bf16 / np1 fp32"]["torch"] == pytest.approx(2.5)
    assert rows["VGG-16 32px model parallel pp2 / data parallel np2"]["tf"] == pytest.approx(1.5)
    table = report.markdown(results)
    assert "| resnet18 32px data np2 --sync-bn | torch | resnet18 3x32x32, batch 32 | 12.0 |" in table
    assert "| resnet18 32px data np1 | torch | 1 |" not in table  # not in the seed CNN's table


def paired(*rounds):
    """results["paired"] from rounds of (name, framework, images/sec), positions as listed."""
    return {"repeat": len(rounds), "rounds": [[{"name": name, "framework": framework, "position": position,
                                                 "median": rate} for position, (name, framework, rate)
                                                in enumerate(runs)] for runs in rounds]}


def test_goals_take_one_ratio_per_round_and_divide_by_the_bound():
    rounds = [[("data np1", "torch", 1000), ("model pp2, 1f1b M4", "torch", 1440),
               ("model pp2, interleaved M4", "torch", 1600), ("model pp2, 1f1b M4", "tf", 720)],
              [("model pp2, 1f1b M4", "tf", 700), ("model pp2, interleaved M4", "torch", 1500),
               ("model pp2, 1f1b M4", "torch", 1400), ("data np1", "torch", 1000)],
              [("data np1", "torch", 1000), ("model pp2, 1f1b M4", "torch", 1500),
               ("model pp2, interleaved M4", "torch", 1600), ("model pp2, 1f1b M4", "tf", 750)]]
    rows = {goal.label: (goal, values) for goal, values in report.goals({**RESULTS, "paired": paired(*rounds)})}
    goal, values = rows["seed CNN: pipeline 1f1b M4 efficiency / the most its cut allows (bubble bound 0.80)"]
    assert goal.threshold == 0.90 and values["tf"] is None
    assert (values["torch"].median, values["torch"].low, values["torch"].high, values["torch"].pairs) == \
        pytest.approx((0.9, 1400 / 1600, 1500 / 1600, 3))
    assert values["torch"].verdict(goal.threshold) == pairing.Verdict.WITHIN_NOISE  # 0.875 < 0.90 <= 0.94
    # Interleaving's efficiency against the 1F1B bound, and its throughput against 1F1B's, round by round.
    assert rows["seed CNN: interleaved M4 efficiency / the 1F1B bound 0.80"][1]["torch"].median == pytest.approx(1.0)
    assert rows["seed CNN: interleaved M4 / 1f1b M4 throughput"][1]["torch"].low == pytest.approx(1600 / 1500)
    tf_over_torch = rows["seed CNN: TensorFlow / PyTorch pipeline, 1f1b M4"][1]["tf"]
    assert (tf_over_torch.low, tf_over_torch.high) == pytest.approx((0.5, 0.5))
    table = report.markdown({**RESULTS, "paired": paired(*rounds)})
    assert ("| seed CNN: pipeline 1f1b M4 efficiency / the most its cut allows (bubble bound 0.80) | ≥ 0.90 | "
            "0.90 (0.87–0.94) within noise | – |" in table)
    # Where the pipeline recorded the most its cut allows, its efficiency is held to that instead.
    cut = {**RESULTS, "paired": paired(*rounds),
           "cases": [*RESULTS["cases"], {"name": "model pp2, 1f1b M4", "framework": "torch", "median": 1440,
                                         "cut_bound": 0.72}]}
    rows = {goal.label: values for goal, values in report.goals(cut)}
    assert rows["seed CNN: pipeline 1f1b M4 efficiency / the most its cut allows (bubble bound 0.80)"][
        "torch"].median == pytest.approx(0.72 / 0.72)
    assert "| seed CNN: TensorFlow / PyTorch pipeline, 1f1b M4 | ≥ 0.90 | – | 0.50 (0.50–0.50) not met |" in table
    assert "each of 3 rounds" in table


def test_a_round_pairs_the_runs_nearest_each_other():
    ratio = pairing.Ratio(("two", "torch"), ("one", "torch"), scale=2)
    runs = [pairing.Run(("one", "torch"), 0, 500.0), pairing.Run(("other", "torch"), 1, 1.0),
            pairing.Run(("two", "torch"), 2, 1800.0), pairing.Run(("one", "torch"), 3, 1000.0)]
    assert pairing.pair_ratio(runs, ratio) == pytest.approx(0.9)  # the run of "one" at 3, not the one at 0
    assert pairing.pair_ratio(runs[:3], ratio) == pytest.approx(1.8)
    assert pairing.pair_ratio(runs[1:3], ratio) is None  # a round without the denominator gives no pair
    spread = pairing.ratio_range([runs, runs[:3], runs[1:3]], ratio)
    assert (spread.median, spread.low, spread.high, spread.pairs) == pytest.approx((1.35, 0.9, 1.8, 2))
    assert pairing.ratio_range([runs[1:3]], ratio) is None


def test_the_verdict_needs_the_whole_range_on_one_side_of_the_goal():
    def verdict(low, high, goal=0.9):
        return pairing.RatioRange((low + high) / 2, low, high, 3).verdict(goal)

    assert verdict(0.91, 1.2) == verdict(0.899, 0.95) == pairing.Verdict.MET  # 0.899 prints as 0.90
    assert verdict(0.7, 0.894) == pairing.Verdict.NOT_MET
    assert verdict(0.85, 0.95) == verdict(0.7, 0.9) == pairing.Verdict.WITHIN_NOISE
    assert str(pairing.Verdict.WITHIN_NOISE) == "within noise"


def test_rounds_alternate_direction_and_the_order_keeps_what_this_run_measures():
    sequence = [("a", "torch"), ("b", "torch"), ("a", "torch"), ("c", "torch")]
    assert pairing.round_order(sequence, 0) == sequence
    assert pairing.round_order(sequence, 1) == sequence[::-1] and pairing.round_order(sequence, 2) == sequence
    # Without "b", the two runs of "a" would come in a row: one is enough.
    assert pairing.measurement_order(sequence, {("a", "torch"), ("c", "torch")}) == [("a", "torch"), ("c", "torch")]


def test_every_goal_divides_cases_at_most_two_runs_apart_that_the_suite_has():
    from benchmarks import run

    sequence = report.goal_sequence()
    listed = {case.key for case in run.cases(run.Settings(False), False)}
    assert set(sequence) <= listed
    sides = set()
    for goal in report.goal_list():
        for ratio in goal.ratios.values():
            assert pairing.distance(sequence, ratio) <= 2, (goal.label, ratio)
            sides |= {ratio.numerator, ratio.denominator}
    assert sides == set(sequence)  # the sequence runs nothing the goals do not divide
    # The quick run's two cases keep their pairing.
    quick = pairing.measurement_order(sequence, {case.key for case in run.cases(run.Settings(True), True)})
    assert quick == [("data np2", "torch"), ("data np1", "torch")]


def test_the_overlap_report_reads_horovods_timeline():
    from benchmarks import overlap

    def tensor(pid, name, handed, reduced):
        events = [{"name": "process_name", "ph": "M", "pid": pid, "args": {"name": name}}]
        for (first, last), (start, end) in zip(handed, reduced):
            events += [{"ph": "B", "name": "NEGOTIATE_ALLREDUCE", "ts": first, "pid": pid},
                       {"ph": "E", "ts": last, "pid": pid}, {"ph": "B", "name": "ALLREDUCE", "ts": start, "pid": pid},
                       {"ph": "B", "name": "MPI_ALLREDUCE", "ts": start + 1, "pid": pid},
                       {"ph": "E", "ts": end - 1, "pid": pid}, {"ph": "E", "ts": end, "pid": pid}]
        return events
    # Two steps: the last layer's gradient handed at 0 and reduced 10..30 while the first layer's
    # backward runs until 50; then the first layer's, reduced 50..60. A BatchNorm average once.
    events = (tensor(1, "gradient_bucket_0_1of1", [(0, 5), (100, 105)], [(10, 30), (110, 130)])
              + tensor(2, "gradient_bucket_1_1of1", [(40, 50), (140, 150)], [(50, 60), (150, 160)])
              + tensor(3, "HorovodGroupedAllreduce_1of2", [(70, 71)], [(72, 80)]))
    reductions = overlap.gradient_reductions(events, steps=2)
    assert sorted(reductions) == ["gradient_bucket_0_1of1", "gradient_bucket_1_1of1"]
    steps = overlap.step_overlaps(reductions)
    assert [step["backward_ms"] for step in steps] == [0.05, 0.05]
    assert [step["allreduce_ms"] for step in steps] == [0.03, 0.03]
    assert steps[0]["overlapped"] == pytest.approx(2 / 3)  # 20 of the 30 µs fall inside 0..50
    assert overlap.union_length([(0, 10), (5, 20), (30, 40)]) == 30
    assert overlap.union_length([(0, 10), (5, 20)], within=(8, 15)) == 7
