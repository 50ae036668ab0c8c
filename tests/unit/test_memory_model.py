"""The memory model's arithmetic, and its saved activations against what PyTorch's autograd
really keeps."""

from dataclasses import replace

import pytest
import torch

from common.core.config import parse_config
from common.model import networks
from common.parallel import memory_model, schedule
from common.parallel.memory_model import FLOAT_BYTES, PieceHeld, RankLoad, estimate, rank_load
from common.parallel.plan import make_plan, partition
from train_torch.model import build_model

SHAPE = (3, 32, 32)


def autograd_saved_bytes(specs, samples):
    """Bytes of the tensors autograd saves for the backward, the parameters left out."""
    model = build_model(specs, SHAPE, 0).train()
    parameters = {parameter.data_ptr() for parameter in model.parameters()}
    saved = {}

    def pack(tensor):
        if tensor.data_ptr() not in parameters:
            saved[(tensor.data_ptr(), tensor.dtype, tuple(tensor.shape))] = tensor.numel() * tensor.element_size()
        return tensor
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(torch.randn(samples, *SHAPE), torch.arange(samples))  # with dropout keys: masks drawn
    return sum(saved.values())


@pytest.mark.parametrize("name", list(networks.ARCHITECTURES))
def test_the_saved_activations_are_what_autograd_keeps(name):
    specs = networks.model_specs(name, SHAPE, 10, dropout=0.3 if name in ("cnn", "resnet18") else None)
    shapes = networks.layer_shapes(specs, SHAPE)
    elements = 3 * 32 * 32 + sum(memory_model.saved_elements(spec, shapes[i]) for i, spec in enumerate(specs))
    predicted = FLOAT_BYTES * 4 * elements  # the images, kept by the first layer, and what each layer keeps
    assert predicted == pytest.approx(autograd_saved_bytes(specs, 4), rel=0.01)  # BatchNorm's per-channel statistics


def whole(specs, microbatch=8, recomputes=False, in_flight=(1,), microbatches=1):
    return RankLoad(pieces=[PieceHeld(0, len(specs), True, True)], microbatch=microbatch,
                    microbatches=microbatches, in_flight=list(in_flight), recomputes=recomputes,
                    reads_images=True, read_ahead=3)


def test_parameters_gradients_and_optimizer_state_scale_with_the_parameters():
    specs = networks.model_specs("resnet8", SHAPE, 10)
    params = networks.total_params(specs, SHAPE)
    for slots in (0, 1, 2):
        found = estimate(specs, SHAPE, whole(specs), slots, baseline=100)
        assert found.parameters == found.gradients == FLOAT_BYTES * params
        assert found.optimizer == slots * FLOAT_BYTES * params
        assert found.baseline == 100 and found.total == sum(vars(found).values())
    assert memory_model.optimizer_slots("adam", 0.9) == 2
    assert [memory_model.optimizer_slots("sgd", m) for m in (0.0, 0.9)] == [0, 1]


def test_activations_grow_with_the_samples_and_the_microbatches_in_flight():
    specs = networks.model_specs("resnet8", SHAPE, 10)
    one = estimate(specs, SHAPE, whole(specs, microbatch=8), 1, 0)
    assert estimate(specs, SHAPE, whole(specs, microbatch=16), 1, 0).activations == 2 * one.activations
    assert estimate(specs, SHAPE, whole(specs, in_flight=(3,)), 1, 0).activations == 3 * one.activations
    assert estimate(specs, SHAPE, whole(specs, microbatch=16), 1, 0).inputs == 2 * one.inputs


def test_a_stage_that_recomputes_keeps_only_its_input_per_microbatch():
    specs = networks.model_specs("resnet8", SHAPE, 10)
    shapes = networks.layer_shapes(specs, SHAPE)
    piece = [PieceHeld(2, 4, False, False)]
    load = RankLoad(piece, 8, 4, [3], False, False, 3)
    keeping = estimate(specs, SHAPE, load, 1, 0)
    recomputing = estimate(specs, SHAPE, RankLoad(piece, 8, 4, [3], True, False, 3), 1, 0)
    input_bytes = FLOAT_BYTES * 8 * shapes[2][0] * shapes[2][1] * shapes[2][2]
    assert recomputing.activations == 3 * input_bytes < keeping.activations
    assert recomputing.working > keeping.working  # one micro-batch's forward, run again
    # Its wire: 4 micro-batches' activations in and gradients back, from its neighbours.
    output_bytes = FLOAT_BYTES * 8 * shapes[4][0] * shapes[4][1] * shapes[4][2]
    assert keeping.wire == 4 * (input_bytes + output_bytes) and keeping.inputs == 0


@pytest.mark.parametrize("kind,chunks", [("gpipe", 1), ("1f1b", 1), ("zb", 1), ("interleaved", 2)])
def test_the_microbatches_in_flight_are_the_schedules_bound(kind, chunks):
    for stage in range(3):
        held = memory_model.pipeline_in_flight(kind, stage, 3, 6, chunks)
        assert len(held) == chunks
        assert sum(held) == schedule.peak_activations(schedule.compute_actions(kind, stage, 3, 6, chunks))
    assert memory_model.pipeline_in_flight("gpipe", 0, 3, 6, 1) == [6]
    assert memory_model.pipeline_in_flight("1f1b", 0, 3, 6, 1) == [3]


def test_each_rank_of_a_hybrid_holds_its_own_stage():
    specs = networks.model_specs("resnet8", SHAPE, 10)
    config = parse_config(["--mode", "hybrid", "--pp", "2", "--dp", "2", "--microbatches", "4",
                           "--batch-size", "32"])
    layout = make_plan(config, 4)
    ranges = partition([cost.flops for cost in networks.layer_costs(specs, SHAPE)], 2)
    loads = [rank_load(config, layout, ranges, rank, 16, False) for rank in range(4)]
    assert loads[0] == loads[2] and loads[1] == loads[3]  # replicas alike
    assert [load.pieces[0].start for load in loads[:2]] == [0, ranges[1][0]]
    assert loads[0].microbatch == 4 and loads[0].reads_images and not loads[1].reads_images
    estimates = [estimate(specs, SHAPE, load, 1, 0) for load in loads[:2]]
    whole_model = estimate(specs, SHAPE, rank_load(parse_config([]), make_plan(parse_config([]), 1),
                                                   [(0, len(specs))], 0, 32, False), 1, 0)
    assert sum(e.parameters for e in estimates) == whole_model.parameters


def test_recomputing_layers_keep_their_outputs_and_one_layers_saved_tensors():
    specs = networks.model_specs("resnet18", SHAPE, 10)
    shapes = networks.layer_shapes(specs, SHAPE)
    keeping = estimate(specs, SHAPE, whole(specs), 1, 0)
    again = estimate(specs, SHAPE, replace(whole(specs), recompute_layers=True), 1, 0)
    outputs = sum(memory_model.kept_when_recomputing(spec, shapes[i]) for i, spec in enumerate(specs))
    assert again.activations == FLOAT_BYTES * 8 * outputs < keeping.activations / 3
    widest = max(memory_model.saved_elements(spec, shapes[i]) for i, spec in enumerate(specs))
    assert again.working == keeping.working + FLOAT_BYTES * 8 * widest


def test_the_ranks_that_write_a_checkpoint_hold_its_copy():
    specs = networks.model_specs("resnet8", SHAPE, 10)
    config = parse_config(["--mode", "hybrid", "--pp", "2", "--dp", "2", "--microbatches", "2", "--batch-size", "32"])
    layout = make_plan(config, 4)
    ranges = partition([cost.flops for cost in networks.layer_costs(specs, SHAPE)], 2)
    writers = [rank_load(config, layout, ranges, rank, 16, False, saves=True).writes_checkpoint for rank in range(4)]
    assert writers == [True, True, False, False]  # replica 0 of each stage
    assert not rank_load(config, layout, ranges, 0, 16, False).writes_checkpoint
    found = estimate(specs, SHAPE, replace(whole(specs), writes_checkpoint=True), 1, 0)
    assert found.checkpoint == found.parameters + found.optimizer
    assert estimate(specs, SHAPE, whole(specs), 1, 0).checkpoint == 0
