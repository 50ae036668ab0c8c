"""The arithmetic behind benchmarks/planner_check.py: the rank correlation, the layouts it
measures, and its table."""

from benchmarks import planner_check


def test_rank_correlation_is_one_for_the_same_order_and_minus_one_for_the_reverse():
    predicted = [10.0, 30.0, 20.0, 40.0]
    assert planner_check.spearman(predicted, [1.0, 3.0, 2.0, 4.0]) == 1.0
    assert planner_check.spearman(predicted, [4.0, 2.0, 3.0, 1.0]) == -1.0
    assert abs(planner_check.spearman(predicted, [1.0, 2.0, 3.0, 4.0]) - 0.8) < 1e-12


def candidate(layout, rejected=""):
    return {"layout": layout, "rejected": rejected}


def test_spread_measures_the_pick_first_then_data_parallel_then_down_the_ranking():
    ranked = [candidate("model pp2 zb M2"), candidate("model pp2 1f1b M2", "over --memory-per-rank"),
              *[candidate(f"model pp2 gpipe M{m}") for m in (2, 4, 8)], candidate("data dp2"),
              *[candidate(f"model pp2 1f1b M{m} recompute") for m in (2, 4, 8)]]
    measured = [found["layout"] for found in planner_check.spread(ranked, 5)]
    assert measured[:2] == ["model pp2 zb M2", "data dp2"]
    assert len(measured) == len(set(measured)) == 5
    assert "model pp2 1f1b M2" not in measured  # rejected layouts are not run


def test_the_table_names_framework_and_workload_and_marks_a_failed_run():
    row = {"layout": "data dp2", "predicted_images_per_sec": 100.0, "images_per_sec": 90.0,
           "predicted_memory_bytes": 2 ** 30, "peak_memory_bytes": 2 ** 29}
    group = {"framework": "tf", "workload": "cnn", "ranks": 2, "rank_correlation": 1.0, "pick": "data dp2",
             "best": "data dp2", "pick_over_best": 1.0, "memory_errors": [1.0],
             "rows": [row, {"layout": "model pp2 zb M2", "error": "boom"}]}
    table = planner_check.markdown([group])
    assert "| tf | cnn | 2 | data dp2 | 100 | 90 | 1024 | 512 |" in table
    assert "| tf | cnn | 2 | model pp2 zb M2 | failed |" in table
    assert "| tf | cnn | 2 | 1.00 | data dp2 | data dp2 | 1.00 | +100% |" in table


def test_each_layout_trains_long_enough_by_its_prediction_within_bounds():
    assert planner_check.steps_for(3200.0, 2.0) == 200  # 6,400 images at 3,200 img/s: two seconds
    assert planner_check.steps_for(10.0, 2.0) == 4  # never fewer than four steps
    assert planner_check.steps_for(1e6, 2.0) == 512  # nor more than 512


def test_each_round_measures_every_layout_once_the_order_reversed_each_round():
    assert planner_check.round_orders(3, 3) == [[0, 1, 2], [2, 1, 0], [0, 1, 2]]
    assert planner_check.round_orders(2, 1) == [[0, 1]]


def test_a_layouts_rounds_combine_into_their_median_and_largest_memory():
    rounds = [{"images_per_sec": 90.0, "peak_memory_bytes": 5, "steps": 8},
              {"images_per_sec": 130.0, "peak_memory_bytes": 7, "steps": 8},
              {"images_per_sec": 100.0, "peak_memory_bytes": 6, "steps": 8}]
    found = planner_check.combined(rounds)
    assert found["images_per_sec"] == 100.0 and found["peak_memory_bytes"] == 7
    assert found["round_images_per_sec"] == [90.0, 130.0, 100.0]
    assert planner_check.combined([rounds[0], {"error": "rank 1 died"}]) == {"error": "rank 1 died"}
