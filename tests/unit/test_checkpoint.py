import json
import os

import numpy as np
import pytest

from common.core import metrics
from common.core.errors import UsageError
from common.model import checkpoint, networks, weights
from common.model.checkpoint import NeutralState

SHAPE = (1, 8, 8)
SPECS = networks.model_specs("cnn", SHAPE, 10)
ARCHITECTURE = checkpoint.architecture("cnn", SHAPE, 10)
SHAPES = weights.expected_shapes(SPECS, SHAPE)


def whole_state(optimizer="sgd"):
    arrays = weights.initial_weights(SPECS, SHAPE, seed=3)
    slots = ({key: {"momentum_buffer": value + 1} for key, value in arrays.items()} if optimizer == "sgd" else
             {key: {"exp_avg": value, "exp_avg_sq": value * value, "step": np.array(7.0, np.float32)}
              for key, value in arrays.items()})
    return NeutralState(arrays, slots)


def save(directory, position, states, optimizer="sgd", before_rename=None):
    """Write ``states`` (one per shard, whole-model keys) the way the trainer does."""
    path = checkpoint.checkpoint_path(str(directory), position)
    temporary = checkpoint.temporary_path(path)
    for index, state in enumerate(states):
        checkpoint.write_shard(temporary, index, state)
    config = {"optimizer": optimizer}
    meta = checkpoint.make_meta(position, ARCHITECTURE, config, len(states), "torch", {}, checkpoint.rng_state())
    checkpoint.commit(temporary, path, meta, before_rename)
    return path


def split(state, ranges):
    """The state cut into stages by layer ranges, as pipeline stages write it."""
    keys = list(state.weights)
    return [NeutralState({k: state.weights[k] for k in weights.layer_keys(keys, a, b)},
                         {k: state.optimizer[k] for k in weights.layer_keys(keys, a, b)}) for a, b in ranges]


def test_shards_written_by_stages_read_back_by_name_in_any_layout(tmp_path):
    state = whole_state("adam")
    path = save(tmp_path, (2, 5), split(state, [(0, 3), (3, len(SPECS))]), optimizer="adam")
    assert os.path.basename(path) == "ckpt-epoch0002-step000005"
    assert sorted(os.listdir(path)) == ["COMPLETE", "meta.json", "shard-000.safetensors", "shard-001.safetensors"]
    opened = checkpoint.Checkpoint(path, ARCHITECTURE, SHAPES)
    assert opened.position == (2, 5) and opened.meta["optimizer"] == "adam"
    # A three-stage reader takes layers 2..4, which straddle both shards.
    keys = weights.layer_keys(list(SHAPES), 2, 5)
    read = opened.state(keys, "adam")
    assert sorted(read.weights) == sorted(keys)
    for key in keys:
        np.testing.assert_array_equal(read.weights[key], state.weights[key])
        assert read.optimizer[key]["step"].shape == () and float(read.optimizer[key]["step"]) == 7.0
        np.testing.assert_array_equal(read.optimizer[key]["exp_avg_sq"], state.optimizer[key]["exp_avg_sq"])


def test_a_kill_before_the_rename_keeps_the_previous_checkpoint(tmp_path):
    save(tmp_path, (1, 0), [whole_state()])

    def killed():
        raise KeyboardInterrupt("killed before the rename")

    with pytest.raises(KeyboardInterrupt):
        save(tmp_path, (2, 0), [whole_state()], before_rename=killed)
    assert [position for position, _ in checkpoint.list_checkpoints(str(tmp_path))] == [(1, 0)]
    checkpoint.prepare_directory(str(tmp_path), resume=True)  # clears the half-made save
    assert sorted(os.listdir(tmp_path)) == ["ckpt-epoch0001"]


def test_commit_refuses_while_a_shard_is_missing(tmp_path):
    path = checkpoint.checkpoint_path(str(tmp_path), (1, 0))
    temporary = checkpoint.temporary_path(path)
    checkpoint.write_shard(temporary, 0, whole_state())
    meta = checkpoint.make_meta((1, 0), ARCHITECTURE, {"optimizer": "sgd"}, 2, "tf", {}, {})
    with pytest.raises(RuntimeError, match="shard-001"):
        checkpoint.commit(temporary, path, meta)
    assert not os.path.exists(path)


@pytest.mark.parametrize("damage,reason", [
    (lambda p: os.remove(os.path.join(p, "COMPLETE")), "incomplete: no COMPLETE marker"),
    (lambda p: open(os.path.join(p, "meta.json"), "w").write("{"), "JSONDecodeError"),
    (lambda p: open(os.path.join(p, "shard-000.safetensors"), "wb").write(b"\x08\x00"), "Error"),
    (lambda p: os.remove(os.path.join(p, "shard-000.safetensors")), "shard-000.safetensors is missing"),
])
def test_damaged_checkpoints_are_one_usage_error(tmp_path, damage, reason):
    path = save(tmp_path, (1, 0), [whole_state()])
    damage(path)
    with pytest.raises(UsageError, match=f"cannot load checkpoint .*ckpt-epoch0001 .*{reason}"):
        checkpoint.Checkpoint(path, ARCHITECTURE, SHAPES)


def test_a_tensor_of_the_wrong_shape_is_refused_before_it_is_read(tmp_path):
    state = whole_state()
    key = next(iter(state.weights))
    state.weights[key] = np.zeros((10 ** 6,), np.float32)
    path = save(tmp_path, (1, 0), [state])
    with pytest.raises(UsageError, match=f"tensor '{key}' has shape"):
        checkpoint.Checkpoint(path, ARCHITECTURE, SHAPES)


def test_optimizer_state_of_the_wrong_shape_is_refused_on_opening(tmp_path):
    state = whole_state("adam")
    key = next(iter(state.optimizer))
    state.optimizer[key]["step"] = np.zeros(3, np.float32)
    path = save(tmp_path, (1, 0), [state], optimizer="adam")
    with pytest.raises(UsageError, match=f"optimizer tensor 'optimizer/{key}/step' has shape \\(3,\\), expected"):
        checkpoint.Checkpoint(path, ARCHITECTURE, SHAPES)


def test_mismatches_are_their_own_exception_types(tmp_path):
    path = save(tmp_path, (1, 0), [whole_state("sgd")])
    with pytest.raises(checkpoint.ArchitectureMismatch, match="holds model 'cnn'.*builds model 'resnet'"):
        checkpoint.Checkpoint(path, checkpoint.architecture("resnet", SHAPE, 10), SHAPES)
    opened = checkpoint.Checkpoint(path, ARCHITECTURE, SHAPES)
    with pytest.raises(checkpoint.OptimizerMismatch, match="holds sgd optimizer state.*--optimizer adam"):
        opened.state(list(SHAPES), "adam")
    assert opened.state(list(SHAPES), None).optimizer == {}  # --init-from reads weights only


def test_meta_is_plain_json_with_position_config_and_rng(tmp_path):
    path = save(tmp_path, (3, 0), [whole_state()])
    meta = json.loads(open(os.path.join(path, "meta.json")).read())
    assert (meta["format"], meta["epoch"], meta["step"], meta["shards"]) == ("cnn-parallel/2", 3, 0, 1)
    state = np.random.get_state()
    np.random.random(5)
    checkpoint.restore_rng(meta["rng"])
    assert np.random.get_state()[2] == state[2]


def test_list_and_prune_keep_the_newest(tmp_path):
    positions = [(1, 0), (2, 0), (2, 7), (3, 0), (10, 0)]
    for position in positions:
        save(tmp_path, position, [whole_state()])
    (tmp_path / ".tmp-ckpt-epoch0011").mkdir()
    assert [position for position, _ in checkpoint.list_checkpoints(str(tmp_path))] == positions
    checkpoint.prune(str(tmp_path), keep=2)
    assert [position for position, _ in checkpoint.list_checkpoints(str(tmp_path))] == [(3, 0), (10, 0)]


def test_prepare_directory_never_trains_over_a_saved_run(tmp_path):
    directory = str(tmp_path / "run")
    with pytest.raises(UsageError, match="no checkpoint"):
        checkpoint.prepare_directory(directory, resume=True)
    checkpoint.prepare_directory(directory, resume=False)
    save(directory, (1, 0), [whole_state()])
    with pytest.raises(UsageError, match="already holds checkpoints; pass --resume"):
        checkpoint.prepare_directory(directory, resume=False)
    checkpoint.prepare_directory(directory, resume=True)


def test_unwritable_directory(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(UsageError, match="cannot write checkpoints"):
        checkpoint.prepare_directory(str(blocker / "sub"), resume=False)


def test_meter_results_are_weighted():
    meter = metrics.Meter()
    meter.add(10.0, 3, 4)
    meter.add(1.0, 1, 1)
    results = metrics.Meter.results(meter.sums)
    assert (results.loss, results.accuracy) == (pytest.approx(11 / 5), pytest.approx(4 / 5))
    empty = metrics.Meter.results(np.zeros(3))
    assert np.isnan(empty.loss) and np.isnan(empty.accuracy)


def test_unreadable_images_are_left_out_of_the_sums():
    logits = np.array([[2.0, 0.0], [0.0, 3.0], [5.0, 0.0]], np.float32)
    labels = np.array([0, 1, 1])
    ignoring = np.array([0, 1, metrics.IGNORED_LABEL])
    assert metrics.softmax_cross_entropy_sums(logits, ignoring) == metrics.softmax_cross_entropy_sums(
        logits[:2], labels[:2])


def test_a_shard_is_written_a_tensor_at_a_time_and_reads_back_with_safetensors(tmp_path):
    """Streamed, not serialised whole first: writing 8 MB of state allocates well under
    one tensor's bytes (tracemalloc sees numpy's and Python's buffers), and safetensors'
    own loader reads every tensor back, a 0-d one included."""
    import tracemalloc

    from safetensors.numpy import load_file

    arrays = {f"{layer}.conv.kernel": np.full((256, 1024), layer, np.float32) for layer in range(8)}
    state = NeutralState(arrays, {"0.conv.kernel": {"step": np.array(3.0, np.float32)}})
    tracemalloc.start()
    try:
        checkpoint.write_shard(str(tmp_path), 0, state)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 256 * 1024 * 4 // 4
    read = load_file(str(tmp_path / checkpoint.shard_name(0)))
    assert sorted(read) == sorted(checkpoint.to_tensors(state))
    for key, value in arrays.items():
        np.testing.assert_array_equal(read[f"weights/{key}"], value)
    assert read["optimizer/0.conv.kernel/step"].shape == () and float(read["optimizer/0.conv.kernel/step"]) == 3.0
