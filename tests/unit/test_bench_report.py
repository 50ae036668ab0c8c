"""The benchmark report's arithmetic, on made-up numbers (benchmarks/report.py is pure)."""

import pytest

from benchmarks import report


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


def test_goals_divide_by_the_bound_and_carry_the_windows_spread():
    cases = [case("data np1", "torch", 1000, 1),
             {**case("model pp2, 1f1b M4", "torch", 1440), "min": 1400, "max": 1500},
             case("model pp2, interleaved M4", "torch", 1600), case("model pp2, 1f1b M4", "tf", 720)]
    rows = {label: (goal, values) for label, goal, values in report.goals({**RESULTS, "cases": cases})}
    goal, values = rows["seed CNN: pipeline 1f1b M4 efficiency / its bound 0.80"]
    assert goal == 0.90 and values["torch"] == pytest.approx((0.9, 0.875, 1500 / 1600)) and values["tf"] is None
    # Interleaving's efficiency 0.8 against the 1F1B bound 0.8, and its throughput against 1F1B's.
    assert rows["seed CNN: interleaved M4 efficiency / the 1F1B bound 0.80"][1]["torch"][0] == pytest.approx(1.0)
    assert rows["seed CNN: interleaved M4 / 1f1b M4 throughput"][1]["torch"][0] == pytest.approx(1600 / 1440)
    assert rows["seed CNN: TensorFlow / PyTorch pipeline, 1f1b M4"][1]["tf"][0] == pytest.approx(0.5)
    table = report.markdown({**RESULTS, "cases": cases})
    assert ("| seed CNN: pipeline 1f1b M4 efficiency / its bound 0.80 | ≥ 0.90 | 0.90 (0.87–0.94) ✔ | – |"
            in table)
    assert "| seed CNN: TensorFlow / PyTorch pipeline, 1f1b M4 | ≥ 0.90 | – | 0.50 (0.48–0.51) ✗ |" in table
