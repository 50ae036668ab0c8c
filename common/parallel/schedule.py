"""Pipeline schedules as data: what each stage does, in order, for one step.

A schedule is a list of (action, micro-batch, chunk) per stage. ``compute_actions``
gives the forwards ("F") and backwards ("B"); ``with_communication`` adds the
point-to-point actions around them. The transport sends without blocking and
receives in schedule order, so a schedule is deadlock-free exactly when
``simulate`` completes it; the unit tests check that for every layout.

A *chunk* is one of the ``chunks`` contiguous model pieces a stage holds. GPipe
and 1F1B give each stage one chunk; the interleaved schedule gives it several:
with K stages, virtual stage ``g = chunk * K + stage`` holds the g-th of K x V
model pieces, so a micro-batch goes round the ranks V times (Megatron-LM's
interleaved 1F1B). The bubble shrinks from (K - 1) / (M + K - 1) of a step to
(K - 1) / (V x M + K - 1), for V - 1 more hops per micro-batch each way.

ZB-H1 (Qi et al., "Zero Bubble Pipeline Parallelism", ICLR 2024) splits a backward
("B") into its input-gradient part ("I"), which the previous stage waits for, and
its weight-gradient part ("W"), which nobody waits for: stage s defers s of its
W's, and they fill the end of the step where 1F1B leaves stage s idle.
"""

from __future__ import annotations

from collections import namedtuple
from collections.abc import Callable

Action = namedtuple("Action", "kind microbatch chunk", defaults=(0,))
SCHEDULES = ("gpipe", "1f1b", "interleaved", "zb")

FORWARD, BACKWARD = "F", "B"
INPUT_GRADIENT, WEIGHT_GRADIENT = "I", "W"  # a backward in two (--schedule zb)
RECV_ACTIVATION, SEND_ACTIVATION = "recv_act", "send_act"
RECV_GRADIENT, SEND_GRADIENT = "recv_grad", "send_grad"


def gpipe(stage: int, stages: int, microbatches: int) -> list[Action]:
    """GPipe: every forward, then every backward; holds all M activations. The last stage
    needs nothing from another stage for its backwards, so it runs each right after its
    forward (holding one activation) and the previous stage gets its first gradient
    as early as it can use it, instead of after the last stage's M forwards."""
    if stage == stages - 1:
        return [Action(kind, m) for m in range(microbatches) for kind in (FORWARD, BACKWARD)]
    return ([Action(FORWARD, m) for m in range(microbatches)]
            + [Action(BACKWARD, m) for m in range(microbatches)])


def one_f_one_b(stage: int, stages: int, microbatches: int) -> list[Action]:
    """1F1B (PipeDream-flush): stages - stage - 1 warm-up forwards, then one
    forward / one backward, then the remaining backwards; at most
    stages - stage activations are held at once."""
    return _warmup_steady_cooldown([Action(FORWARD, m) for m in range(microbatches)],
                                   [Action(BACKWARD, m) for m in range(microbatches)],
                                   stages - stage - 1)


def interleaved_warmup(stage: int, stages: int, chunks: int) -> int:
    """Forwards an interleaved stage runs before its first backward (Megatron-LM's count):
    the later stages' first round trip, plus one round of the stage's other chunks."""
    return (stages - stage - 1) * 2 + (chunks - 1) * stages


def interleaved(stage: int, stages: int, microbatches: int, chunks: int) -> list[Action]:
    """Interleaved 1F1B over ``chunks`` model pieces per stage. Micro-batches go in rounds
    of ``stages``: a round runs through chunk 0, then chunk 1, ...; backwards take the
    chunks in reverse. A step without whole rounds (--microbatches is a multiple of the
    stages, but an epoch's short last batch may have fewer micro-batches) runs every
    forward, then every backward, piece by piece: always deadlock-free, and such a batch
    is small."""
    if microbatches % stages:
        forwards = [Action(FORWARD, m, chunk) for chunk in range(chunks) for m in range(microbatches)]
        return forwards + [Action(BACKWARD, m, chunk) for chunk in reversed(range(chunks))
                           for m in range(microbatches)]

    def order(kind, reverse):
        actions = []
        for k in range(microbatches * chunks):
            round_, within = divmod(k, stages * chunks)
            chunk = within // stages
            actions.append(Action(kind, round_ * stages + k % stages, chunks - 1 - chunk if reverse else chunk))
        return actions
    return _warmup_steady_cooldown(order(FORWARD, False), order(BACKWARD, True),
                                   interleaved_warmup(stage, stages, chunks))


def zero_bubble_h1(stage: int, stages: int, microbatches: int) -> list[Action]:
    """ZB-H1: 1F1B's warm-up (stages - stage - 1 forwards), then its steady forward /
    backward pairs, with each backward cut into I (sent upstream at once) and W. Stage s
    lets its first s W's wait and then runs one W, oldest first, after each I; the s
    still waiting at the end fill what would be its cool-down bubble. The first stage
    sends no gradient, so it defers nothing and runs whole backwards. At most ``stages``
    micro-batches are held between their F and W, as on 1F1B's first stage."""
    if stage == 0:
        return one_f_one_b(stage, stages, microbatches)
    inputs = [Action(INPUT_GRADIENT, m) for m in range(microbatches)]
    with_inputs = _warmup_steady_cooldown([Action(FORWARD, m) for m in range(microbatches)], inputs,
                                          stages - stage - 1)
    actions, weights = [], iter(Action(WEIGHT_GRADIENT, m) for m in range(microbatches))
    for action in with_inputs:
        actions.append(action)
        if action.kind == INPUT_GRADIENT and action.microbatch >= stage:
            actions.append(next(weights))
    return actions + list(weights)


def _warmup_steady_cooldown(forwards: list[Action], backwards: list[Action], warmup: int) -> list[Action]:
    """``warmup`` forwards, then alternate one forward and one backward, then the rest."""
    warmup = min(warmup, len(forwards))
    actions = forwards[:warmup]
    for forward, backward in zip(forwards[warmup:], backwards):
        actions += [forward, backward]
    return actions + backwards[len(forwards) - warmup:]


def compute_actions(schedule: str, stage: int, stages: int, microbatches: int, chunks: int = 1) -> list[Action]:
    if schedule == "interleaved":
        return interleaved(stage, stages, microbatches, chunks)
    return {"gpipe": gpipe, "1f1b": one_f_one_b, "zb": zero_bubble_h1}[schedule](stage, stages, microbatches)


def with_communication(actions: list[Action], stage: int, stages: int, chunks: int = 1) -> list[Action]:
    """Insert the receives before and the sends after each compute action: nothing comes
    into the model's first piece or goes out of its last (virtual stages 0 and K x V - 1)."""
    full = []
    for action in actions:
        m, chunk = action.microbatch, action.chunk
        virtual = chunk * stages + stage
        first, last = virtual == 0, virtual == stages * chunks - 1
        if action.kind == FORWARD:
            full += ([] if first else [Action(RECV_ACTIVATION, m, chunk)]) + [action] \
                + ([] if last else [Action(SEND_ACTIVATION, m, chunk)])
        elif action.kind == WEIGHT_GRADIENT:
            full.append(action)  # from what its I kept: nothing to receive or send
        else:  # a whole backward, or its input-gradient part
            full += ([] if last else [Action(RECV_GRADIENT, m, chunk)]) + [action] \
                + ([] if first else [Action(SEND_GRADIENT, m, chunk)])
    return full


def stage_schedules(schedule: str, stages: int, microbatches: int, chunks: int = 1) -> list[list[Action]]:
    return [with_communication(compute_actions(schedule, s, stages, microbatches, chunks), s, stages, chunks)
            for s in range(stages)]


def peak_activations(actions: list[Action]) -> int:
    """Most (micro-batch, chunk) pieces whose forward has run but whose backward (or, split,
    its W) has not."""
    return sum(held_at_peak(actions, 1 + max((action.chunk for action in actions), default=0)))


def held_at_peak(actions: list[Action], chunks: int) -> list[int]:
    """Per chunk: the micro-batches held (forward run, backward or, split, W not yet) when
    the stage holds the most in all."""
    held = [0] * chunks
    peak, at_peak = 0, list(held)
    for action in actions:
        held[action.chunk] += {FORWARD: 1, BACKWARD: -1, WEIGHT_GRADIENT: -1}.get(action.kind, 0)
        if sum(held) > peak:
            peak, at_peak = sum(held), list(held)
    return at_peak


def simulate(schedules: list[list[Action]]) -> list:
    """Run the stages' action lists with non-blocking sends and blocking receives.

    Returns the global order of executed actions as (stage, action); raises
    RuntimeError naming the blocked stages if no stage can make progress.
    """
    stages = len(schedules)
    position = [0] * stages
    in_flight: set[tuple] = set()  # (kind of message, micro-batch, receiving virtual stage)
    order = []
    while any(position[s] < len(schedules[s]) for s in range(stages)):
        progressed = False
        for s in range(stages):
            while position[s] < len(schedules[s]):
                action = schedules[s][position[s]]
                virtual = action.chunk * stages + s
                if action.kind in (RECV_ACTIVATION, RECV_GRADIENT):
                    message = ("activation" if action.kind == RECV_ACTIVATION else "gradient", action.microbatch,
                               virtual)
                    if message not in in_flight:
                        break  # blocked until the neighbour sends it
                    in_flight.remove(message)
                elif action.kind == SEND_ACTIVATION:
                    in_flight.add(("activation", action.microbatch, virtual + 1))
                elif action.kind == SEND_GRADIENT:
                    in_flight.add(("gradient", action.microbatch, virtual - 1))
                order.append((s, action))
                position[s] += 1
                progressed = True
        if not progressed:
            blocked = {s: schedules[s][position[s]] for s in range(stages) if position[s] < len(schedules[s])}
            raise RuntimeError(f"deadlock: stages blocked at {blocked}")
    if in_flight:
        raise RuntimeError(f"messages never received: {sorted(in_flight)}")
    return order


def bubble_bound(schedule: str, stages: int, microbatches: int, chunks: int = 1) -> float:
    """The fraction of a step each stage computes when every piece costs the same (a
    backward twice a forward) and communication is free: M / (M + K - 1), or
    V x M / (V x M + K - 1) interleaved. ZB-H1 with M >= K, F = I = W, idles K - 1
    forwards (its paper's (K - 1)(F + I - W)) in a step of 3M of work."""
    if schedule == "zb":
        return 3 * microbatches / (3 * microbatches + stages - 1)
    work = microbatches * (chunks if schedule == "interleaved" else 1)
    return work / (work + stages - 1)


def partition_bound(schedule: str, stages: int, microbatches: int, piece_costs: list, chunks: int = 1,
                    backward_ratio: float = 2.0, input_share: float = 0.5) -> float:
    """The best efficiency a cut allows: the work of the pieces (forward ``piece_costs[v]``,
    backward ``backward_ratio`` times that) spread evenly over ``stages`` ranks, against a step
    of ``schedule`` with free messages. It is the bubble bound when the pieces cost the same,
    and lower when one piece outweighs the others (a layer that is most of the model paces
    every cut of it); measured efficiencies are judged against it, not against the bubble's."""
    seconds = step_time(stage_schedules(schedule, stages, microbatches, chunks), piece_costs, backward_ratio,
                        input_share=input_share)
    return microbatches * (1 + backward_ratio) * sum(piece_costs) / stages / seconds


def step_time(schedules: list[list[Action]], piece_costs: list, backward_ratio: float = 2.0,
              order: list | None = None, input_share: float = 0.5, backward_costs: list | None = None,
              message_costs: list | None = None) -> float:
    """How long a step of ``schedules`` takes when piece v's forward costs ``piece_costs[v]``
    and its backward ``backward_costs[v]`` (default: ``backward_ratio`` times the forward;
    split, ``input_share`` of it the I and the rest the W), and a message across the cut
    after piece v takes ``message_costs[v]`` (default: free): each stage runs its actions
    in order, a receive waits for its send to arrive. Deadlock-free schedules only; pass
    ``simulate(schedules)`` as ``order`` to time many cost sets of one schedule."""
    stages = len(schedules)
    clock = [0.0] * stages
    sent = {}
    backward = backward_costs or [backward_ratio * cost for cost in piece_costs]
    messages = message_costs or [0.0] * len(piece_costs)
    for s, action in order if order is not None else simulate(schedules):  # each receive after its send
        virtual = action.chunk * stages + s
        if action.kind in COMPUTE:
            clock[s] += _compute_seconds(action.kind, piece_costs[virtual], backward[virtual], input_share)
        elif action.kind in (SEND_ACTIVATION, SEND_GRADIENT):
            message, across = _message_sent(action, virtual)
            sent[message] = clock[s] + messages[across]
        else:
            clock[s] = max(clock[s], sent[_message_awaited(action, virtual)])
    return max(clock)


def shared_step_time(schedules: list[list[Action]], piece_costs: list, backward_costs: list,
                     message_costs: list, slowdown: Callable[[int], float], input_share: float = 0.5) -> float:
    """``step_time`` for stages that share their CPUs: while k stages compute at once, each
    computes (and each message sent then travels) ``slowdown(k)`` times slower than alone,
    and a stage waiting for a message takes nothing from the others. Simulated event by
    event: between two events (a compute's end, a message's arrival) every rate holds."""
    stages = len(schedules)
    position, left = [0] * stages, [0.0] * stages  # left: the running compute's seconds still to do, alone
    running = [False] * stages
    arrives: dict[tuple, float] = {}
    now = 0.0
    while True:
        _start_what_can_start(schedules, position, running, left, arrives, now,
                              lambda action, virtual: _compute_seconds(action.kind, piece_costs[virtual],
                                                                       backward_costs[virtual], input_share),
                              lambda across: message_costs[across] * slowdown(max(1, sum(running))))
        busy = [s for s in range(stages) if running[s]]
        pending = [at for at in arrives.values() if at > now]
        if not busy and not pending:
            if any(position[s] < len(schedules[s]) for s in range(stages)):
                raise RuntimeError(f"deadlock: stages blocked at positions {position}")
            return now
        factor = slowdown(len(busy)) if busy else 1.0
        step = min([left[s] * factor for s in busy] + [at - now for at in pending])
        now += step
        for s in busy:
            left[s] -= step / factor
            if left[s] <= 1e-12 * (1.0 + now):  # this compute ends now
                running[s], position[s] = False, position[s] + 1


def _start_what_can_start(schedules, position, running, left, arrives, now, compute_seconds, message_seconds):
    """Move each idle stage on through its actions at ``now``: sends post their message,
    receives take one that has arrived, and a compute starts; until none can move."""
    stages = len(schedules)
    moved = True
    while moved:
        moved = False
        for s in range(stages):
            while not running[s] and position[s] < len(schedules[s]):
                action = schedules[s][position[s]]
                virtual = action.chunk * stages + s
                if action.kind in COMPUTE:
                    running[s], left[s] = True, compute_seconds(action, virtual)
                    break
                if action.kind in (SEND_ACTIVATION, SEND_GRADIENT):
                    message, across = _message_sent(action, virtual)
                    arrives[message] = now + message_seconds(across)
                elif arrives.get(_message_awaited(action, virtual), float("inf")) > now:
                    break
                position[s] += 1
                moved = True


COMPUTE = (FORWARD, BACKWARD, INPUT_GRADIENT, WEIGHT_GRADIENT)


def _compute_seconds(kind: str, forward: float, backward: float, input_share: float) -> float:
    return {FORWARD: forward, BACKWARD: backward, INPUT_GRADIENT: input_share * backward,
            WEIGHT_GRADIENT: (1 - input_share) * backward}[kind]


def _message_sent(action: Action, virtual: int) -> tuple[tuple, int]:
    """The message a send posts, and the cut it crosses (the piece it leaves by its end)."""
    if action.kind == SEND_ACTIVATION:
        return ("activation", action.microbatch, virtual + 1), virtual
    return ("gradient", action.microbatch, virtual - 1), virtual - 1


def _message_awaited(action: Action, virtual: int) -> tuple:
    return ("activation" if action.kind == RECV_ACTIVATION else "gradient", action.microbatch, virtual)
