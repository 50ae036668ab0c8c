import pytest

from common.parallel import schedule
from common.parallel.schedule import BACKWARD, FORWARD, INPUT_GRADIENT, WEIGHT_GRADIENT, Action

ONE_CHUNK = ("gpipe", "1f1b")  # one model piece per stage
LAYOUTS = [(stages, microbatches) for stages in (1, 2, 3, 4, 5) for microbatches in (1, 2, 3, 4, 8)]
# Interleaved: micro-batches in whole rounds of the stages, 2-4 chunks per stage.
INTERLEAVED = [(stages, microbatches, chunks) for stages in (2, 3, 4, 5) for chunks in (2, 3, 4)
               for microbatches in (stages, 2 * stages, 3 * stages)]


@pytest.mark.parametrize("kind", ONE_CHUNK)
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


@pytest.mark.parametrize("kind", ONE_CHUNK)
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
        assert schedule.peak_activations(gpipe) == (1 if stage == stages - 1 else microbatches)
        assert schedule.peak_activations(ofob) == min(stages - stage, microbatches)


def test_one_f_one_b_order_on_four_stages():
    assert [f"{a.kind}{a.microbatch}" for a in schedule.one_f_one_b(1, 4, 4)] == \
        ["F0", "F1", "F2", "B0", "F3", "B1", "B2", "B3"]
    assert [f"{a.kind}{a.microbatch}" for a in schedule.one_f_one_b(3, 4, 4)] == \
        ["F0", "B0", "F1", "B1", "F2", "B2", "F3", "B3"]


def test_communication_around_compute():
    actions = schedule.with_communication([Action(FORWARD, 0), Action(BACKWARD, 0)], stage=1, stages=3)
    assert [a.kind for a in actions] == ["recv_act", "F", "send_act", "recv_grad", "B", "send_grad"]
    # Interleaved on 2 stages: stage 1's chunk 0 (virtual stage 1) sends on to stage 0's
    # chunk 1; its chunk 1 (virtual stage 3) is the model's end.
    pieces = [Action(FORWARD, 0, 0), Action(FORWARD, 0, 1), Action(BACKWARD, 0, 1), Action(BACKWARD, 0, 0)]
    assert [a.kind for a in schedule.with_communication(pieces, stage=1, stages=2, chunks=2)] == \
        ["recv_act", "F", "send_act", "recv_act", "F", "B", "send_grad", "recv_grad", "B", "send_grad"]


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


@pytest.mark.parametrize("stages,microbatches,chunks", INTERLEAVED)
def test_interleaved_runs_every_piece_once_in_order(stages, microbatches, chunks):
    for stage in range(stages):
        actions = schedule.interleaved(stage, stages, microbatches, chunks)
        for kind in (FORWARD, BACKWARD):
            pieces = sorted((a.chunk, a.microbatch) for a in actions if a.kind == kind)
            assert pieces == [(c, m) for c in range(chunks) for m in range(microbatches)]
        for chunk in range(chunks):
            # Each chunk's backwards in micro-batch order, each after its forward.
            assert [a.microbatch for a in actions if a.kind == BACKWARD and a.chunk == chunk] == \
                list(range(microbatches))
            for m in range(microbatches):
                assert actions.index(Action(FORWARD, m, chunk)) < actions.index(Action(BACKWARD, m, chunk))


@pytest.mark.parametrize("stages,microbatches,chunks", INTERLEAVED)
def test_interleaved_is_deadlock_free_and_follows_the_virtual_stages(stages, microbatches, chunks):
    order = schedule.simulate(schedule.stage_schedules("interleaved", stages, microbatches, chunks))
    done = {(a.chunk * stages + s, a.kind, a.microbatch): i for i, (s, a) in enumerate(order)}
    last = stages * chunks - 1
    for m in range(microbatches):
        for virtual in range(1, last + 1):  # the piece before a piece runs its forward first
            assert done[(virtual - 1, FORWARD, m)] < done[(virtual, FORWARD, m)]
        for virtual in range(last):  # and its backward after
            assert done[(virtual + 1, BACKWARD, m)] < done[(virtual, BACKWARD, m)]
        assert done[(last, FORWARD, m)] < done[(last, BACKWARD, m)]


@pytest.mark.parametrize("stages,microbatches,chunks", INTERLEAVED)
def test_interleaved_activation_memory(stages, microbatches, chunks):
    for stage, actions in enumerate(schedule.stage_schedules("interleaved", stages, microbatches, chunks)):
        # Warm-up forwards plus the one in flight: fewer pieces than GPipe's M x V.
        held = schedule.peak_activations(actions)
        assert held == min(microbatches * chunks, schedule.interleaved_warmup(stage, stages, chunks) + 1)


def test_interleaved_order_on_two_stages():
    def written(stage):
        return [f"{a.kind}{a.microbatch}.{a.chunk}" for a in schedule.interleaved(stage, 2, 4, 2)]
    assert written(0) == ["F0.0", "F1.0", "F0.1", "F1.1", "F2.0", "B0.1", "F3.0", "B1.1",
                          "F2.1", "B0.0", "F3.1", "B1.0", "B2.1", "B3.1", "B2.0", "B3.0"]
    assert written(1) == ["F0.0", "F1.0", "F0.1", "B0.1", "F1.1", "B1.1", "F2.0", "B0.0",
                          "F3.0", "B1.0", "F2.1", "B2.1", "F3.1", "B3.1", "B2.0", "B3.0"]


@pytest.mark.parametrize("stages,chunks", [(2, 2), (3, 2), (4, 3), (5, 4)])
def test_interleaved_steps_without_whole_rounds_run_forwards_then_backwards(stages, chunks):
    """An epoch's short last batch may give fewer micro-batches than whole rounds."""
    for microbatches in range(1, 2 * stages):
        if microbatches % stages == 0:
            continue
        order = schedule.simulate(schedule.stage_schedules("interleaved", stages, microbatches, chunks))
        for stage in range(stages):
            actions = [a for s, a in order if s == stage and a.kind in (FORWARD, BACKWARD)]
            assert actions[:microbatches * chunks] == [Action(FORWARD, m, c) for c in range(chunks)
                                                       for m in range(microbatches)]
            assert sorted(actions[microbatches * chunks:]) == sorted(Action(BACKWARD, m, c) for c in range(chunks)
                                                                     for m in range(microbatches))


@pytest.mark.parametrize("stages,microbatches", [(2, 4), (2, 8), (4, 4), (4, 8)])
def test_each_schedule_reaches_its_bubble_bound_and_interleaving_beats_1f1b(stages, microbatches):
    """With equal pieces, backward = 2 x forward and free messages, a step lasts exactly
    what the bubble bound says; interleaving V = 2 or 3 chunks shortens it below 1F1B's."""
    efficiency = {}
    for name, chunks in (("gpipe", 1), ("1f1b", 1), ("interleaved", 2), ("interleaved", 3)):
        seconds = schedule.step_time(schedule.stage_schedules(name, stages, microbatches, chunks),
                                     [1.0 / chunks] * (stages * chunks))
        efficiency[name, chunks] = microbatches * 3.0 / seconds  # each stage's work: M x (1 + 2)
        assert efficiency[name, chunks] == pytest.approx(schedule.bubble_bound(name, stages, microbatches, chunks))
    assert efficiency["1f1b", 1] < efficiency["interleaved", 2] < efficiency["interleaved", 3]


def test_step_time_follows_the_slowest_piece():
    """Unequal pieces stretch a step: 1F1B on 2 stages whose second costs twice the first
    is paced by the second (M forwards and backwards of cost 2 + 4, plus the first's
    forward and backward of one micro-batch: the fill and drain)."""
    seconds = schedule.step_time(schedule.stage_schedules("1f1b", 2, 4), [1.0, 2.0])
    assert seconds == pytest.approx(4 * (2.0 + 4.0) + 1.0 + 2.0)


@pytest.mark.parametrize("name,chunks", [("gpipe", 1), ("1f1b", 1), ("interleaved", 2)])
def test_the_partition_bound_is_the_bubble_bound_for_equal_pieces_and_lower_for_a_dominant_one(name, chunks):
    equal = [1.0] * (2 * chunks)
    assert schedule.partition_bound(name, 2, 4, equal, chunks) == pytest.approx(
        schedule.bubble_bound(name, 2, 4, chunks))
    # One piece holds 70% of the work (the seed CNN's second convolution): the other rank idles
    # for much of the step whatever the schedule, so the bound falls below the bubble's. On two
    # stages the step is M of the large piece plus one of the small one: M(a+b) / 2(Mb+a).
    dominant = [0.3, 0.7] if chunks == 1 else [0.1, 0.7, 0.1, 0.1]
    bound = schedule.partition_bound(name, 2, 4, dominant, chunks)
    assert bound < 0.85 * schedule.bubble_bound(name, 2, 4, chunks)
    if chunks == 1:
        assert bound == pytest.approx(4 * 1.0 / (2 * (4 * 0.7 + 0.3)))
    # Perfectly balanced work with many micro-batches approaches 1.
    assert schedule.partition_bound("1f1b", 2, 64, [1.0, 1.0]) > 0.98


# --- ZB-H1 (--schedule zb) -------------------------------------------------------------

def _backward_parts(actions, m):
    """Where micro-batch m's input and weight gradients come: a whole backward is both."""
    def at(kind):
        return next(i for i, a in enumerate(actions) if a.kind in (kind, BACKWARD) and a.microbatch == m)
    return at(INPUT_GRADIENT), at(WEIGHT_GRADIENT)


@pytest.mark.parametrize("stages,microbatches", LAYOUTS)
def test_zero_bubble_runs_every_part_once_in_order(stages, microbatches):
    for stage in range(stages):
        actions = schedule.zero_bubble_h1(stage, stages, microbatches)
        kinds = {FORWARD, BACKWARD} if stage == 0 else {FORWARD, INPUT_GRADIENT, WEIGHT_GRADIENT}
        assert {a.kind for a in actions} == kinds  # the first stage sends no gradient: whole backwards
        for kind in kinds:
            # Each part in micro-batch order, once: gradients go upstream in the order they are sent.
            assert [a.microbatch for a in actions if a.kind == kind] == list(range(microbatches))
        for m in range(microbatches):
            input_part, weight_part = _backward_parts(actions, m)
            assert actions.index(Action(FORWARD, m)) < input_part <= weight_part
        # Stage s holds back its first s weight gradients, and no more.
        waiting = [a.microbatch for a in actions if a.kind == INPUT_GRADIENT]
        weights = [i for i, a in enumerate(actions) if a.kind == WEIGHT_GRADIENT]
        if stage and microbatches > stage:
            assert actions.index(Action(INPUT_GRADIENT, waiting[stage])) < weights[0]


@pytest.mark.parametrize("stages,microbatches", LAYOUTS)
def test_zero_bubble_is_deadlock_free_and_keeps_1f1b_memory(stages, microbatches):
    schedules = schedule.stage_schedules("zb", stages, microbatches)
    order = schedule.simulate(schedules)
    done = {}
    for i, (s, a) in enumerate(order):
        done[(s, "input" if a.kind in (INPUT_GRADIENT, BACKWARD) else a.kind, a.microbatch)] = i
    for m in range(microbatches):
        for s in range(1, stages):
            assert done[(s - 1, FORWARD, m)] < done[(s, FORWARD, m)]
        for s in range(stages - 1):  # a stage's input gradient waits for the next stage's
            assert done[(s + 1, "input", m)] < done[(s, "input", m)]
    ofob_peak = max(schedule.peak_activations(actions) for actions in schedule.stage_schedules("1f1b", stages,
                                                                                                microbatches))
    for actions in schedules:  # held from a forward until its weight gradient
        assert schedule.peak_activations(actions) <= ofob_peak == min(stages, microbatches)


def test_zero_bubble_order_on_three_stages():
    def written(stage):
        return " ".join(f"{a.kind}{a.microbatch}" for a in schedule.zero_bubble_h1(stage, 3, 4))
    assert written(0) == "F0 F1 F2 B0 F3 B1 B2 B3"
    assert written(1) == "F0 F1 I0 F2 I1 W0 F3 I2 W1 I3 W2 W3"
    assert written(2) == "F0 I0 F1 I1 F2 I2 W0 F3 I3 W1 W2 W3"
    full = schedule.with_communication(schedule.zero_bubble_h1(1, 3, 1), stage=1, stages=3)
    assert [a.kind for a in full] == ["recv_act", "F", "send_act", "recv_grad", "I", "send_grad", "W"]


@pytest.mark.parametrize("stages,microbatches", [(2, 4), (2, 8), (3, 4), (4, 4), (4, 8)])
def test_zero_bubble_reaches_its_bound_and_beats_1f1b(stages, microbatches):
    """Equal pieces, backward = 2 x forward split evenly, free messages, M >= stages: a step
    idles (stages - 1) x (F + I - W) = stages - 1 forwards, a third of 1F1B's bubble."""
    def efficiency(name, backward_ratio=2.0, input_share=0.5):
        seconds = schedule.step_time(schedule.stage_schedules(name, stages, microbatches), [1.0] * stages,
                                     backward_ratio, input_share=input_share)
        return microbatches * (1 + backward_ratio) / seconds
    assert efficiency("zb") == pytest.approx(schedule.bubble_bound("zb", stages, microbatches))
    assert efficiency("zb") == pytest.approx(3 * microbatches / (3 * microbatches + stages - 1))
    assert efficiency("zb") > efficiency("1f1b") == pytest.approx(schedule.bubble_bound("1f1b", stages, microbatches))
    # The longer the weight gradient, the more of the bubble it fills (here all but the
    # first forward's wait on the later stages: nothing is there to fill it).
    assert efficiency("zb", 3.0, 1 / 3) > efficiency("zb") > efficiency("zb", 3.0, 0.9)


SHARED_CASES = [("gpipe", 2, 4, 1), ("1f1b", 3, 6, 1), ("zb", 4, 8, 1), ("interleaved", 2, 4, 2), ("1f1b", 4, 1, 1)]


def _uneven(pieces: int, scale: float = 1.0) -> list[float]:
    return [scale * (1.0 + 0.37 * ((7 * v) % 5)) for v in range(pieces)]  # unequal, no two ties by design


@pytest.mark.parametrize("name,stages,microbatches,chunks", SHARED_CASES)
def test_shared_step_time_alone_and_at_a_constant_slowdown_is_step_time(name, stages, microbatches, chunks):
    """Stages that never slow each other take step_time's step; a slowdown that does not
    depend on how many compute stretches the whole step by it, messages included."""
    schedules = schedule.stage_schedules(name, stages, microbatches, chunks)
    pieces = stages * chunks
    forwards, backwards, messages = _uneven(pieces), _uneven(pieces, 2.3), _uneven(pieces, 0.1)
    free = schedule.step_time(schedules, forwards, backward_costs=backwards, message_costs=messages)
    assert schedule.shared_step_time(schedules, forwards, backwards, messages, lambda busy: 1.0) == pytest.approx(free)
    assert schedule.shared_step_time(schedules, forwards, backwards, messages,
                                     lambda busy: 1.7) == pytest.approx(1.7 * free)


@pytest.mark.parametrize("name,stages,microbatches,chunks", SHARED_CASES)
def test_shared_step_time_slows_only_the_moments_when_stages_compute_together(name, stages, microbatches, chunks):
    """Each of k stages computing at once runs k times slower (k ranks on one core): the
    step lies between step_time's and step_time's at the worst slowdown; one micro-batch
    never has two stages computing at once, so its step is step_time's."""
    schedules = schedule.stage_schedules(name, stages, microbatches, chunks)
    forwards, backwards, zero = _uneven(stages * chunks), _uneven(stages * chunks, 2.0), [0.0] * (stages * chunks)
    free = schedule.step_time(schedules, forwards, backward_costs=backwards, message_costs=zero)
    shared = schedule.shared_step_time(schedules, forwards, backwards, zero, lambda busy: float(busy))
    if microbatches == 1:
        assert shared == pytest.approx(free)
    else:
        assert free < shared < stages * free


def test_shared_step_time_of_two_stages_on_one_core_is_their_work():
    """Two stages sharing one core (each half speed while both compute) cannot finish
    before the core has done all their work, and in 1F1B with enough micro-batches they
    overlap nearly throughout: the step is the work, plus what the fill and drain leave
    one stage alone."""
    stages, microbatches = 2, 8
    schedules = schedule.stage_schedules("1f1b", stages, microbatches)
    work = microbatches * stages * (1.0 + 2.0)
    shared = schedule.shared_step_time(schedules, [1.0, 1.0], [2.0, 2.0], [0.0, 0.0], lambda busy: float(busy))
    assert work <= shared <= work + 1.0 + 2.0


def test_shared_step_time_names_a_deadlock():
    wrong = [[Action(schedule.RECV_GRADIENT, 0), Action(FORWARD, 0)], [Action(schedule.RECV_ACTIVATION, 0)]]
    with pytest.raises(RuntimeError, match="deadlock"):
        schedule.shared_step_time(wrong, [1.0, 1.0], [2.0, 2.0], [0.0, 0.0], lambda busy: 1.0)
