"""Pipeline schedules as data: what each stage does, in order, for one step.

A schedule is a list of (action, micro-batch) per stage. ``compute_actions``
gives the forwards ("F") and backwards ("B"); ``with_communication`` adds the
point-to-point actions around them. The transport sends without blocking and
receives in schedule order, so a schedule is deadlock-free exactly when
``simulate`` completes it; the unit tests check that for every layout.
"""

from __future__ import annotations

from collections import namedtuple

Action = namedtuple("Action", "kind microbatch")
SCHEDULES = ("gpipe", "1f1b")

FORWARD, BACKWARD = "F", "B"
RECV_ACTIVATION, SEND_ACTIVATION = "recv_act", "send_act"
RECV_GRADIENT, SEND_GRADIENT = "recv_grad", "send_grad"


def gpipe(stage: int, stages: int, microbatches: int) -> list[Action]:
    """GPipe: every forward, then every backward; holds all M activations."""
    return ([Action(FORWARD, m) for m in range(microbatches)]
            + [Action(BACKWARD, m) for m in range(microbatches)])


def one_f_one_b(stage: int, stages: int, microbatches: int) -> list[Action]:
    """1F1B (PipeDream-flush): stages - stage - 1 warm-up forwards, then one
    forward / one backward, then the remaining backwards; at most
    stages - stage activations are held at once."""
    warmup = min(stages - stage - 1, microbatches)
    actions = [Action(FORWARD, m) for m in range(warmup)]
    forward, backward = warmup, 0
    while forward < microbatches:
        actions += [Action(FORWARD, forward), Action(BACKWARD, backward)]
        forward, backward = forward + 1, backward + 1
    actions += [Action(BACKWARD, m) for m in range(backward, microbatches)]
    return actions


def compute_actions(schedule: str, stage: int, stages: int, microbatches: int) -> list[Action]:
    return {"gpipe": gpipe, "1f1b": one_f_one_b}[schedule](stage, stages, microbatches)


def with_communication(actions: list[Action], stage: int, stages: int) -> list[Action]:
    """Insert the receives before and the sends after each compute action."""
    first, last = stage == 0, stage == stages - 1
    full = []
    for action in actions:
        m = action.microbatch
        if action.kind == FORWARD:
            full += ([] if first else [Action(RECV_ACTIVATION, m)]) + [action] \
                + ([] if last else [Action(SEND_ACTIVATION, m)])
        else:
            full += ([] if last else [Action(RECV_GRADIENT, m)]) + [action] \
                + ([] if first else [Action(SEND_GRADIENT, m)])
    return full


def stage_schedules(schedule: str, stages: int, microbatches: int) -> list[list[Action]]:
    return [with_communication(compute_actions(schedule, s, stages, microbatches), s, stages)
            for s in range(stages)]


def peak_activations(actions: list[Action]) -> int:
    """Most micro-batches whose forward has run but whose backward has not."""
    held = peak = 0
    for action in actions:
        held += {FORWARD: 1, BACKWARD: -1}.get(action.kind, 0)
        peak = max(peak, held)
    return peak


def simulate(schedules: list[list[Action]]) -> bool:
    """Run the stages' action lists with non-blocking sends and blocking receives.

    Returns the global order of executed actions as (stage, action); raises
    RuntimeError naming the blocked stages if no stage can make progress.
    """
    stages = len(schedules)
    position = [0] * stages
    in_flight = set()  # (kind of message, micro-batch, receiving stage)
    order = []
    while any(position[s] < len(schedules[s]) for s in range(stages)):
        progressed = False
        for s in range(stages):
            while position[s] < len(schedules[s]):
                action = schedules[s][position[s]]
                if action.kind == RECV_ACTIVATION:
                    message = ("activation", action.microbatch, s)
                elif action.kind == RECV_GRADIENT:
                    message = ("gradient", action.microbatch, s)
                else:
                    message = None
                if message is not None:
                    if message not in in_flight:
                        break  # blocked until the neighbour sends it
                    in_flight.remove(message)
                elif action.kind == SEND_ACTIVATION:
                    in_flight.add(("activation", action.microbatch, s + 1))
                elif action.kind == SEND_GRADIENT:
                    in_flight.add(("gradient", action.microbatch, s - 1))
                order.append((s, action))
                position[s] += 1
                progressed = True
        if not progressed:
            blocked = {s: schedules[s][position[s]] for s in range(stages) if position[s] < len(schedules[s])}
            raise RuntimeError(f"deadlock: stages blocked at {blocked}")
    if in_flight:
        raise RuntimeError(f"messages never received: {sorted(in_flight)}")
    return order
