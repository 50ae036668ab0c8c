"""Each rank's peak memory, predicted from the layout: pure arithmetic, no framework.

A rank holds, on top of what its process held before it built the model (the framework,
the runtime, the dataset: measured, ``baseline``):
- its pieces' parameters, their gradients and the optimizer's state (SGD with momentum
  one slot a parameter, Adam two);
- what the backward keeps: each layer's saved tensors for every micro-batch in flight,
  the schedule's bound, or only the piece's input where a stage recomputes its forward
  at the backward (then one micro-batch's saved tensors while it does);
- the backward's working set: the gradients flowing through the largest layer;
- the wire's buffers (a pipeline: one per message, kept from step to step);
- the batches read ahead and the one training (the ranks that read images);
- a checkpoint shard while it is written: the weights and optimizer state copied out
  (written a tensor at a time from the copy; the ranks that write one; the writes come
  after a step's tensors are freed, but a CPU's allocator keeps what training held, so
  they add up).
Everything is float32 (--amp keeps float32 weights, and the saved tensors are counted at
four bytes either way: an upper bound under bf16).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from math import prod

from common.core.config import RunConfig
from common.model import networks
from common.parallel import schedule
from common.parallel.plan import ParallelPlan

FLOAT_BYTES = 4


def optimizer_slots(optimizer: str, momentum: float) -> int:
    """Tensors of optimizer state per parameter tensor."""
    if optimizer == "adam":
        return 2
    return 1 if momentum > 0 else 0


def saved_elements(spec: networks.Spec, shape: tuple) -> int:
    """Per sample: the elements of what a layer computes that the backward keeps (autograd's
    saved tensors). A layer's input is the previous layer's output and is counted there
    (the piece's own input is the wire's or the reader's); its output is counted here,
    since the next layer keeps it (a convolution's, a dense layer's, a pool's input), and
    so are BatchNorm's input, an activation's input or output, a max-pool's int64 indices
    and a dropout's mask and product."""
    out = prod(spec.out_shape(shape))
    if isinstance(spec, networks.Conv):
        return out
    if isinstance(spec, networks.ConvBN):  # ReLU keeps its output, ReLU6 (a clamp) its input
        return out * {"relu": 2, "relu6": 3}.get(spec.activation, 1)
    if isinstance(spec, networks.BLOCKS):
        return sum(saved_elements(part, in_shape) for _, part, in_shape in spec.parts(shape)) + out
    if isinstance(spec, networks.MaxPool):
        return 3 * out  # the output, and the indices at twice a float's size
    if isinstance(spec, networks.Dense):
        return (out if spec.relu else 0) + (2 * prod(shape) if spec.dropout > 0 else 0)  # the mask, the product
    if isinstance(spec, networks.Flatten):
        return 0  # a view of its input
    return out  # an average pool's output, the next layer's input


def kept_when_recomputing(spec: networks.Spec, shape: tuple) -> int:
    """Per sample, under --recompute: the layer's output, the next layer's input (a view for
    a flatten)."""
    return 0 if isinstance(spec, networks.Flatten) else prod(spec.out_shape(shape))


def working_elements(spec: networks.Spec, shape: tuple) -> int:
    """Per sample: what a layer's backward holds at once beyond the saved tensors, the
    gradient arriving at its output and the one it computes for its input (for a block,
    its widest part's)."""
    if isinstance(spec, networks.BLOCKS):
        return max(working_elements(part, in_shape) for _, part, in_shape in spec.parts(shape)) + prod(shape)
    return prod(shape) + prod(spec.out_shape(shape))


@dataclass(frozen=True)
class MemoryEstimate:
    """One rank's predicted peak, in bytes, by what holds it."""
    baseline: int        # the process before the model: measured
    parameters: int
    gradients: int
    optimizer: int
    activations: int     # what the backward keeps of the micro-batches in flight
    working: int         # the backward's transient gradients (and a recomputed forward)
    wire: int            # a pipeline's message buffers
    inputs: int          # batches read ahead
    checkpoint: int = 0  # a checkpoint shard being written: the state's copy
    allocator: int = 0   # beyond the tensors: what the allocator and the kernels' first runs keep, as a
                         # whole-model step measured it once (--mode auto's profile); 0 where unmeasured

    @property
    def total(self) -> int:
        return sum(getattr(self, field.name) for field in fields(self))

    @property
    def tensors(self) -> int:
        """What the rank's own tensors hold: all but the baseline and the allocator's share."""
        return self.total - self.baseline - self.allocator

    def record(self) -> dict:
        return {**{field.name: getattr(self, field.name) for field in fields(self)}, "total": self.total}

    def describe(self) -> str:
        parts = ", ".join(f"{field.name} {mebibytes(getattr(self, field.name))}" for field in fields(self)
                          if getattr(self, field.name))
        return f"{mebibytes(self.total)} ({parts})"


def mebibytes(count: float) -> str:
    return f"{count / 2 ** 20:.0f} MiB"


@dataclass(frozen=True)
class HeldBeyondTensors:
    """What a process holds besides its model's tensors, as --mode auto's profile measured it."""
    baseline: int   # bytes held before any model was built
    allocator: int  # bytes the allocator keeps beyond the tensors (allocator_excess)


@dataclass(frozen=True)
class PieceHeld:
    """A model piece on a rank, as the memory model sees it."""
    start: int
    end: int
    first: bool                 # reads the images (no input gradient, no received activations)
    last: bool                  # computes the loss (no output gradient received)


@dataclass(frozen=True)
class RankLoad:
    """What one rank runs: its pieces and how it steps through them."""
    pieces: Sequence[PieceHeld]
    microbatch: int             # samples per micro-batch (data mode: the rank's whole batch)
    microbatches: int           # micro-batches per step (data mode: 1)
    in_flight: Sequence[int]    # per piece: micro-batches whose backward has not yet run, at the peak
    recomputes: bool            # pieces before the model's last keep only their input, recomputing at the backward
    reads_images: bool
    read_ahead: int             # batches the reader holds: those read ahead and the one training
    recompute_layers: bool = False  # --recompute: each layer keeps only its input, and runs again at the backward
    writes_checkpoint: bool = False  # the rank writes a checkpoint shard (its state copied, then written)


def estimate(specs: Sequence[networks.Spec], input_shape: tuple, load: RankLoad, optimizer_state: int,
             baseline: int, allocator: int = 0) -> MemoryEstimate:
    """The rank's predicted peak memory for ``load``, ``optimizer_state`` slots a parameter, with
    ``allocator`` bytes beyond the tensors (measured: allocator_excess)."""
    shapes = networks.layer_shapes(specs, input_shape)
    params = sum(spec.params(shapes[i]) for piece in load.pieces for i, spec in
                 enumerate(specs) if piece.start <= i < piece.end)
    kept, working, wire = 0, 0, 0
    for piece, held in zip(load.pieces, load.in_flight):
        layers = range(piece.start, piece.end)
        saved = sum(saved_elements(specs[i], shapes[i]) for i in layers)
        widest = max(working_elements(specs[i], shapes[i]) for i in layers)
        if load.recompute_layers:
            widest += max(saved_elements(specs[i], shapes[i]) for i in layers)  # one layer's, run again
            saved = sum(kept_when_recomputing(specs[i], shapes[i]) for i in layers)
        if load.recomputes and not piece.last:
            kept += held * prod(shapes[piece.start])
            widest += saved  # one micro-batch's forward, run again for its backward
        else:
            kept += held * saved
        working = max(working, widest)
        if not piece.first:
            wire += load.microbatches * prod(shapes[piece.start])  # activations received
        if not piece.last:
            wire += load.microbatches * prod(shapes[piece.end])  # gradients received
    inputs = load.read_ahead * load.microbatch * load.microbatches * prod(input_shape) if load.reads_images else 0
    per_sample = FLOAT_BYTES * load.microbatch
    found = MemoryEstimate(baseline=baseline, parameters=FLOAT_BYTES * params, gradients=FLOAT_BYTES * params,
                           optimizer=FLOAT_BYTES * params * optimizer_state, activations=per_sample * kept,
                           working=per_sample * working, wire=per_sample * wire, inputs=FLOAT_BYTES * inputs)
    state = found.parameters + found.optimizer
    return replace(found, allocator=allocator, checkpoint=state if load.writes_checkpoint else 0)


def allocator_excess(specs: Sequence[networks.Spec], input_shape: tuple, samples: int, measured: int) -> int:
    """How much more than the model's tensors a whole-model training step of ``samples`` (SGD
    with momentum, one batch in hand) made the process hold, given that it grew by
    ``measured`` bytes (StageFactory.measure_step_memory): the allocator's free lists and
    what the kernels keep after their first run for the model's shapes. On a CPU, about the
    same whatever the layout, since glibc keeps what it freed below its mmap threshold."""
    load = RankLoad([PieceHeld(0, len(specs), True, True)], samples, 1, [1], False, True, 1)
    return max(0, measured - estimate(specs, input_shape, load, 1, 0).tensors)


def pipeline_in_flight(kind: str, stage: int, stages: int, microbatches: int, chunks: int) -> list[int]:
    """Per chunk of ``stage``: its micro-batches held when it holds the most in all."""
    return schedule.held_at_peak(schedule.compute_actions(kind, stage, stages, microbatches, chunks), chunks)


def rank_load(config: RunConfig, layout: ParallelPlan, ranges: Sequence[tuple[int, int]], rank: int,
              rank_batch: int, stashes_inputs_only: bool, saves: bool = False) -> RankLoad:
    """What ``rank`` runs under ``layout``, its model cut into ``ranges`` (one per piece);
    ``saves``: the run writes checkpoints (replica 0 of each stage writes a shard)."""
    writes = saves and layout.replica_of(rank) == 0 if layout.pipelined else saves and rank == 0
    if not layout.pipelined:  # a replica of the whole model (or ps: the server and its workers)
        steps = max(1, config.accumulation_steps)
        return RankLoad(pieces=[PieceHeld(0, ranges[-1][1], True, True)], microbatch=-(-rank_batch // steps),
                        microbatches=steps, in_flight=[1], recomputes=False, reads_images=True,
                        read_ahead=config.prefetch_batches + 1, recompute_layers=config.recompute,
                        writes_checkpoint=writes)
    stage = layout.stage_of(rank)
    pieces = []
    for chunk in range(layout.chunks):
        virtual = layout.virtual_stage(stage, chunk)
        start, end = ranges[virtual]
        pieces.append(PieceHeld(start, end, virtual == 0, virtual == layout.virtual_stages - 1))
    return RankLoad(pieces=pieces, microbatch=-(-rank_batch // config.microbatches),
                    microbatches=config.microbatches,
                    in_flight=pipeline_in_flight(str(config.schedule), stage, layout.pp, config.microbatches,
                                                 layout.chunks),
                    recomputes=stashes_inputs_only, reads_images=pieces[0].first,
                    read_ahead=config.prefetch_batches + 1, recompute_layers=config.recompute,
                    writes_checkpoint=writes)
