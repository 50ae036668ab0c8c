"""One checkpoint format: a run resumed epoch by epoch in another framework and
another layout each time, optimizer state included, ends where an uninterrupted
run ends."""

import pytest

from tests.helpers import (
    assert_ok,
    checkpoint_path,
    checkpoint_weights,
    completed,
    optimizer_arrays,
    relative_difference,
    resumed_after,
    run_training,
)

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
            assert completed(result)["resumed"] == resumed_after(directory, epoch - 1)
    return checkpoint_path(directory, len(legs))


@pytest.mark.parametrize("extra,legs,tolerance", [
    # One chain through every kind of layout (SGD's momentum moves in test_stop_resume and the unit
    # round trip): each framework writes and reads data, pipeline and parameter-server checkpoints.
    # Adam's moments and step count must travel with the weights: restarting them at any hop
    # changes the moments entirely (and the bias correction). Adam also divides by each
    # gradient's running RMS, which magnifies the float round-off of the layouts' different
    # summation orders in near-zero gradients: 3e-4 in the first kernel's moment after six hops.
    (["--optimizer", "adam", "--lr", 0.002, "--dropout", 0.25],
     [("torch", PP2, 2), ("tf", PS, 3), ("torch", PP3, 3), ("tf", [], None), ("torch", PS, 3), ("tf", PP2, 2)], 1e-3),
], ids=["adam: torch pp2 -> tf ps -> torch pp3 -> tf data -> torch ps -> tf pp2"])
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
