"""common/model/loss_scale.py: TensorFlow's fp16 loss scale moves exactly as torch.amp.GradScaler's."""

import torch

from common.model.loss_scale import GROWTH_INTERVAL, DynamicLossScale


def test_overflow_halves_and_skips_clean_steps_double_after_the_interval():
    scale = DynamicLossScale(1024.0)
    assert scale.update(False, primary=False) is False and scale.scale == 512.0
    for _ in range(GROWTH_INTERVAL - 1):
        assert scale.update(True, primary=False)
    assert scale.scale == 512.0
    assert scale.update(True, primary=False) and scale.scale == 1024.0
    assert scale.update(False, primary=False) is False and scale.scale == 512.0 and scale.clean_steps == 0


def test_same_scale_and_skips_as_torch_grad_scaler():
    """The same overflow pattern through GradScaler (on a real parameter) and through ours."""
    parameter = torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.SGD([parameter], lr=1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 20)
    ours = DynamicLossScale(2.0 ** 20)
    for overflow in (True, True, False, True, False, False, True):
        optimizer.zero_grad()
        scaler.scale(torch.ones(()))  # what scaling the loss does to GradScaler's state
        parameter.grad = torch.full((3,), float("inf") if overflow else 1.0)
        before = parameter.detach().clone()
        scaler.step(optimizer)
        scaler.update()
        applied = ours.update(not overflow, primary=False)
        assert applied == (not torch.equal(parameter.detach(), before))
        assert ours.scale == scaler.get_scale()


def test_the_recorded_scale_round_trips_and_a_malformed_record_is_none():
    kept = DynamicLossScale(1024.0, 7)
    assert DynamicLossScale.from_record(kept.record()) == kept
    for malformed in (None, [], {"scale": "big", "clean_steps": 1}, {"scale": -1.0, "clean_steps": 0},
                      {"scale": 8.0}, {"scale": float("nan"), "clean_steps": 0},
                      {"scale": float("inf"), "clean_steps": 0}, {"scale": 8.0, "clean_steps": -1}):
        assert DynamicLossScale.from_record(malformed) is None, malformed
