"""--mode auto: the planner's dry run, a run that trains with its choice (both frameworks), and
a model whose data-parallel layout does not fit --memory-per-rank, which must train as a
pipeline to the weights one process computes."""

import pytest

from tests.helpers import assert_ok, checkpoint_path, checkpoint_weights, completed, relative_difference, run_training

SYNTHETIC = ["--dataset", "synthetic", "--synthetic-samples", 64]


def test_a_dry_run_ranks_every_layout_for_the_ranks_asked_and_trains_nothing(tmp_path):
    result = assert_ok(run_training(["--mode", "auto", "--plan-only", "--plan-ranks", 4, "--checkpoint-dir",
                                     tmp_path / "never"]))
    lines = result.stdout.splitlines()
    assert lines[0].startswith("--mode auto on 4 rank(s)")
    rows = [line for line in lines if line[:2] in ("  ", "->") and "img/s" not in line]
    assert sum(row.startswith("->") for row in rows) == 1
    assert {row[2:].split()[0] for row in rows} == {"data", "model", "hybrid"}
    choice = result.summary["layout_choice"]
    assert len(choice["candidates"]) == len(rows) and choice["chosen"] == choice["candidates"][0]
    # How much the four ranks would slow each other, for 1 to 4 of them computing at once.
    slowdowns = choice["busy_slowdowns"]
    assert len(slowdowns) == 4 and slowdowns[0] == 1.0 and slowdowns == sorted(slowdowns)
    assert slowdowns[-1] == choice["contention"]
    assert not (tmp_path / "never").exists() and "epoch" not in result.stdout


@pytest.mark.parametrize("framework", ["torch", "tf"])
def test_auto_trains_with_the_layout_it_chose_and_records_its_predictions(framework):
    summary = completed(run_training(["--mode", "auto", "--epochs", 1, "--steps-per-epoch", 2, "--batch-size", 16],
                                     np_=2, framework=framework))
    choice = summary["layout_choice"]
    chosen = choice["chosen"]
    assert chosen["layout"].split()[0] == summary["mode"]
    assert summary["pp"] == (1 if summary["mode"] == "data" else int(chosen["layout"].split()[1][2:]))
    assert chosen["predicted_images_per_sec"] > 0 and not chosen["rejected"]
    assert len(choice["busy_slowdowns"]) == 2 and choice["busy_slowdowns"][0] == 1.0  # measured: one, then both
    # Memory: each rank's peak measured beside its prediction.
    assert len(summary["peak_memory"]) == len(summary["predicted_memory"]) == 2
    for measured, predicted in zip(summary["peak_memory"], summary["predicted_memory"]):
        assert predicted["total"] > predicted["baseline"] > 0 and measured > predicted["baseline"]
    # The start-up figure is the one the planner chose by (its baseline from before the profile).
    # (The planner predicts each stage; every rank is one stage's.)
    assert {predicted["total"] for predicted in summary["predicted_memory"]} <= set(chosen["predicted_memory_bytes"])


def test_a_model_too_large_for_data_parallel_trains_as_a_pipeline_to_the_same_weights(tmp_path):
    """VGG-11 holds three copies of its 28 M parameters (weights, gradients, momentum) on every
    data-parallel rank, and about half that on a pipeline's; a limit between the two must send
    the planner to a pipeline, whose weights after two steps are one process's."""
    steps = [*SYNTHETIC, "--model", "vgg11", "--batch-size", 16, "--epochs", 1, "--steps-per-epoch", 2,
             "--lr", 0.01, "--momentum", 0.9]
    saving = ["--checkpoint-dir", tmp_path / "auto"]  # the plan counts the checkpoint shards the run writes
    plan = assert_ok(run_training([*steps, *saving, "--mode", "auto", "--plan-only"], np_=2)).summary["layout_choice"]
    need = {found["layout"]: max(found["predicted_memory_bytes"]) for found in plan["candidates"]}
    data = need["data dp2"]
    smallest = min(need.values())
    assert data > smallest + (64 << 20), need  # the gap this test stands on
    limit = (data + smallest) // 2
    auto = completed(run_training([*steps, *saving, "--mode", "auto", "--memory-per-rank", limit], np_=2))
    chosen = auto["layout_choice"]["chosen"]
    assert auto["mode"] == "model" and max(chosen["predicted_memory_bytes"]) <= limit
    refused = next(found for found in auto["layout_choice"]["candidates"] if found["layout"] == "data dp2")
    assert "over --memory-per-rank" in refused["rejected"]
    completed(run_training([*steps, "--checkpoint-dir", tmp_path / "one"]))
    architecture = {"model": "vgg11", "input_shape": [3, 32, 32], "num_classes": 10, "stem": "cifar"}
    pipelined = checkpoint_weights(checkpoint_path(tmp_path / "auto", 1), architecture)
    single = checkpoint_weights(checkpoint_path(tmp_path / "one", 1), architecture)
    assert sorted(pipelined) == sorted(single)
    for key, value in single.items():
        assert relative_difference(pipelined[key], value) <= 1e-5, key


def test_no_layout_that_fits_stops_with_one_line():
    result = run_training(["--mode", "auto", "--memory-per-rank", "1M", "--epochs", 1], np_=2)
    assert result.returncode == 2
    assert "no layout fits --memory-per-rank 1 MiB" in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
