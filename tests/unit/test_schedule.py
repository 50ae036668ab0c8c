import pytest

from common import schedule
from common.schedule import BACKWARD, FORWARD, Action

LAYOUTS = [(stages, microbatches) for stages in (1, 2, 3, 4, 5) for microbatches in (1, 2, 3, 4, 8)]


@pytest.mark.parametrize("kind", schedule.SCHEDULES)
@pytest.mark.parametrize("stages,microbatches", LAYOUTS)
def test_every_microbatch_forward_then_backward_once_per_stage(kind, stages, microbatches):
    for stage in range(stages):
        actions = schedule.compute_actions(kind, stage, stages, microbatches)
        assert sorted(a.microbatch for a in actions if a.kind == FORWARD) == list(range(microbatches))
        assert sorted(a.microbatch for a in actions if a.kind == BACKWARD) == list(range(microbatches))
        for m in range(microbatches):
            assert actions.index(Action(FORWARD, m)) < actions.index(Action(BACKWARD, m))
        # Backwards run in micro-batch order on every stage, so gradients arrive in send order.
        assert [a.microbatch for a in actions if a.kind == BACKWARD] == list(range(microbatches))


@pytest.mark.parametrize("kind", schedule.SCHEDULES)
@pytest.mark.parametrize("stages,microbatches", LAYOUTS)
def test_schedules_are_deadlock_free_and_respect_dependencies(kind, stages, microbatches):
    order = schedule.simulate(schedule.stage_schedules(kind, stages, microbatches))
    done = {(s, a.kind, a.microbatch): i for i, (s, a) in enumerate(order)}
    for m in range(microbatches):
        for s in range(1, stages):  # a stage's forward follows the previous stage's
            assert done[(s - 1, FORWARD, m)] < done[(s, FORWARD, m)]
        for s in range(stages - 1):  # and its backward follows the next stage's
            assert done[(s + 1, BACKWARD, m)] < done[(s, BACKWARD, m)]


@pytest.mark.parametrize("stages,microbatches", LAYOUTS)
def test_activation_memory(stages, microbatches):
    for stage in range(stages):
        gpipe = schedule.with_communication(schedule.gpipe(stage, stages, microbatches), stage, stages)
        ofob = schedule.with_communication(schedule.one_f_one_b(stage, stages, microbatches), stage, stages)
        assert schedule.peak_activations(gpipe) == microbatches
        assert schedule.peak_activations(ofob) == min(stages - stage, microbatches)


def test_one_f_one_b_order_on_four_stages():
    assert [f"{a.kind}{a.microbatch}" for a in schedule.one_f_one_b(1, 4, 4)] == \
        ["F0", "F1", "F2", "B0", "F3", "B1", "B2", "B3"]
    assert [f"{a.kind}{a.microbatch}" for a in schedule.one_f_one_b(3, 4, 4)] == \
        ["F0", "B0", "F1", "B1", "F2", "B2", "F3", "B3"]


def test_communication_around_compute():
    actions = schedule.with_communication([Action(FORWARD, 0), Action(BACKWARD, 0)], stage=1, stages=3)
    assert [a.kind for a in actions] == ["recv_act", "F", "send_act", "recv_grad", "B", "send_grad"]


def test_simulator_detects_a_deadlock():
    broken = schedule.stage_schedules("gpipe", 2, 2)
    broken[0] = [a for a in broken[0] if a.kind != "send_act" or a.microbatch != 1]  # a dropped send
    with pytest.raises(RuntimeError, match="deadlock"):
        schedule.simulate(broken)
    cyclic = schedule.stage_schedules("1f1b", 2, 2)
    early = Action("recv_grad", 0)  # stage 0 waits for a gradient before sending any activation
    cyclic[0] = [early] + [a for a in cyclic[0] if a != early]
    with pytest.raises(RuntimeError, match="deadlock"):
        schedule.simulate(cyclic)
