"""One checkpoint format: a run resumed epoch by epoch in another framework and
another layout each time, optimizer state included, ends where an uninterrupted
run ends."""

import pytest

from tests.helpers import (assert_ok, checkpoint_path, checkpoint_weights, optimizer_arrays, relative_difference,
                           run_training)

STEPS = ["--steps-per-epoch", 4, "--batch-size", 32]
PP2 = ["--mode", "model", "--pp", 2, "--microbatches", 2]
PP3 = ["--mode", "model", "--pp", 3, "--microbatches", 4, "--schedule", "gpipe"]
PS = ["--mode", "ps"]


def resumed_epoch_by_epoch(directory, legs, extra):
    """Epoch k of the run in legs[k-1] = (framework, layout args, ranks), each resuming the last."""
    for epoch, (framework, layout, np_) in enumerate(legs, start=1):
        resume = ["--resume"] if epoch > 1 else []
        result = assert_ok(run_training([*STEPS, *extra, *layout, "--epochs", epoch, "--checkpoint-dir", directory,
                                         *resume], np_=np_, framework=framework))
        if epoch > 1:
            assert f"resumed from {checkpoint_path(directory, epoch - 1)} (after epoch {epoch - 1})" in result.stdout
    return checkpoint_path(directory, len(legs))


@pytest.mark.parametrize("extra,legs,tolerance", [
    # Adam's moments and step count must travel with the weights: restarting them
    # at any hop moves the weights by far more than the tolerance.
    (["--optimizer", "adam", "--lr", 0.002],
     [("torch", PP2, 2), ("tf", [], None), ("torch", PP3, 3), ("tf", PP2, 2)], 1e-4),
    (["--lr", 0.05], [("torch", PS, 3), ("torch", [], 2), ("tf", PS, 3), ("tf", [], None)], 1e-5),
], ids=["adam: torch pp2 -> tf data -> torch pp3 -> tf pp2", "sgd: torch ps -> torch data -> tf ps -> tf data"])
def test_a_run_moved_between_frameworks_and_layouts_ends_where_it_would_have(tmp_path, extra, legs, tolerance):
    straight = tmp_path / "straight"
    assert_ok(run_training([*STEPS, *extra, "--epochs", len(legs), "--checkpoint-dir", straight]))
    expected, expected_slots = (checkpoint_weights(checkpoint_path(straight, len(legs))),
                                optimizer_arrays(checkpoint_path(straight, len(legs))))
    moved = resumed_epoch_by_epoch(tmp_path / "moved", legs, extra)
    actual, actual_slots = checkpoint_weights(moved), optimizer_arrays(moved)
    for key, value in expected.items():
        assert relative_difference(actual[key], value) <= tolerance, key
    assert expected_slots.keys() == actual_slots.keys() and expected_slots
    steps = [value for key, value in actual_slots.items() if key.endswith("/step")]
    assert all(float(step) == 4 * len(legs) for step in steps)  # Adam counted each step once, no more
    for key, value in expected_slots.items():
        assert relative_difference(actual_slots[key], value) <= tolerance, key
