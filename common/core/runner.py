"""The contracts between the trainer, the runners and the frameworks' stages, as types.

    Trainer (common/core/trainer.py)  --uses-->  Runner: one rank's part of a step, evaluation,
                                            checkpoint shards, and its Collectives
    Runner  (data: train_*/data_parallel.py; model/hybrid: common/parallel/pipeline.py;
             ps: common/parallel/parameter_server.py)
    PipelineRunner, ParameterServerRunner  --hold-->  Stage: a framework's arithmetic for
                                            layers start..end-1 (train_torch/stage.py, train_tf/stage.py);
                                            a pipeline rank holds one per model piece

Nothing here imports a framework or MPI.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from common.core.config import RunConfig
from common.core.metrics import StepSums
from common.data.batches import Batch, Feed, Reads
from common.model.checkpoint import Checkpoint, NeutralState
from common.model.loss_scale import DynamicLossScale
from common.observe.memory import MemoryMeter
from common.observe.timeline import Timeline
from common.parallel.plan import ParallelPlan


class Wire(Protocol):
    """How one rank's tensors travel: the buffers MPI reads and writes, keyed by message
    (kind, micro-batch, chunk), so a buffer is reused by the same message every step."""

    description: str  # for the start-up lines: what MPI is handed

    def receive_buffer(self, key: tuple, shape: tuple):
        """A float32 buffer of ``shape`` for MPI to receive message ``key`` into (free to
        overwrite: the wire waits for whatever still reads its last contents)."""

    def arrived(self, key: tuple, buffer):
        """The framework tensor of a received buffer (on the rank's device)."""

    def send_buffer(self, key: tuple, tensor):
        """A buffer holding ``tensor``'s values, complete, for MPI to send as message ``key``;
        it stays untouched until Transport.finish."""


OpenCheckpoint = Callable[[], Checkpoint]


class Collectives(Protocol):
    """What every rank calls together; the trainer's only way to talk to the other ranks."""

    def allreduce_sums(self, sums: np.ndarray, name: str) -> np.ndarray: ...

    def broadcast_object(self, value, name: str): ...

    def allgather_object(self, value, name: str) -> list:
        """Every rank's ``value``, in rank order, on every rank."""

    def flag_sum(self, value: int) -> int:
        """The sum of ``value`` over the ranks (a sync point)."""

    def start_flag_sum(self, value: int) -> Callable[[], int]:
        """The same, answered by the returned function after the next train_step (so it
        can travel with that step's communication instead of adding a round trip)."""


class Runner(Protocol):
    framework: str                   # "torch" or "tf"
    rank: int
    world_size: int
    threads: int
    primary: bool                    # the one rank that logs, writes metrics and commits checkpoints
    data_shards: int                 # data-parallel replicas sharing each global batch
    data_shard: int                  # this rank's replica
    plan: ParallelPlan
    layout: Sequence[str]            # lines describing the placement, logged once
    ranges: Sequence[tuple[int, int]]  # each model piece's layers [first, end), in model order
    layer_costs: Sequence[float]     # pipelines: each layer's cost the cut was made by (--balance)
    last_piece_costs: Sequence[float]  # what the layers would cost in the model's last piece, where
                                       # that differs (a TF piece before it also recomputes its forward)
    collectives: Collectives
    checkpoint_shards: int           # how many shards this layout's checkpoints have
    timeline: Timeline               # --timeline's spans (enabled in model/hybrid/ps mode)
    reads: Reads                     # what this rank needs of each batch (images, labels)
    feed: Feed                       # where its batches are read into and how they reach its device
    memory: MemoryMeter              # the rank's memory, made before its model was built
    stashes_inputs_only: bool        # pieces before the model's last keep only their input for the
                                     # backward (and recompute the forward), per the memory model

    def set_lr(self, value: float) -> None: ...

    def train_step(self, batch: Batch, global_count: int) -> StepSums:
        """One optimizer step on this rank's ``batch`` (staged by ``feed``) of a global batch of
        ``global_count``; this rank's (loss sum, correct, count), possibly still on the device."""

    def evaluate(self, batches: Iterable[Batch]) -> StepSums:
        """(loss sum, correct, count) over this rank's slice of the test set, in ``batches``."""

    def checkpoint_shard(self) -> tuple[int, NeutralState] | None:
        """Collective: (shard index, state under whole-model keys) on the ranks that write one."""

    def load_state(self, open_checkpoint: OpenCheckpoint | None, with_optimizer: bool) -> None:
        """Collective: every rank takes its part of the checkpoint (None: keep the seed's
        weights, synchronised)."""

    def loss_scale(self) -> DynamicLossScale | None:
        """--amp fp16: the dynamic loss scale now (the same on every rank), for the checkpoint."""

    def restore_loss_scale(self, state: DynamicLossScale) -> None:
        """--amp fp16 on resume: go on at the scale the checkpoint recorded (on every rank)."""

    def start_timeline(self, path: str) -> None:
        """Collective, once the run directory has settled --timeline's path: begin recording
        for ``path`` ("": no timeline)."""

    def write_timeline(self) -> None:
        """Collective, when ``timeline.enabled``: write every rank's spans to --timeline."""


class ElasticRunner(Runner, Protocol):
    def run_elastic(self, start: Callable[[], tuple], train_from: Callable) -> object:
        """--elastic: run ``train_from(position, commit)`` from ``start()``'s position, again
        from the last commit whenever workers leave or join."""


@dataclass(frozen=True)
class StagePlace:
    """Which layers a stage holds and what it may need to know about its neighbours."""
    specs: tuple
    input_shape: tuple               # the whole model's input (C, H, W)
    start: int
    end: int
    first: bool
    last: bool
    config: RunConfig
    local_rank: int                  # picks this rank's GPU, where there are GPUs
    feed: Feed                       # the rank's input path (StageFactory.make_feed)
    keep_forward: bool = False       # a framework that recomputes: keep the forward for the backward
                                     # instead (StageFactory.keeping_is_faster)


class Stage(Protocol):
    """A framework's arithmetic for one pipeline stage (or, in ps mode, the whole model)."""

    has_parameters: bool

    def share_batch_norm_statistics(self) -> None:
        """Collective over the stage's replicas (hybrid): average the BatchNorm running
        statistics, so every replica evaluates, and replica 0 saves, the same model."""

    def zero_grad(self) -> None: ...

    def set_lr(self, value: float) -> None: ...

    def forward(self, microbatch: int, inputs, batch: Batch, scale: float) -> tuple[object, tuple[float, float]]:
        """(output tensor for the next stage, or None on the last; (loss sum, correct) on the
        last). ``inputs``: the previous stage's output (a tensor from the Wire), None on the
        first, which reads ``batch``'s pixels; the last reads its labels. ``scale`` is
        1 / global batch."""

    def backward(self, microbatch: int, output_gradient) -> object:
        """The gradient (a tensor) for the previous stage (None on the first)."""

    def backward_input(self, microbatch: int, output_gradient) -> object:
        """The first part of a backward cut in two (--schedule zb): the previous stage's
        gradient, as ``backward`` returns it, keeping what backward_weight needs (never on
        the first stage)."""

    def backward_weight(self, microbatch: int) -> None:
        """The second part: the micro-batch's weight gradients, added to the others
        (after its backward_input; together they add up what ``backward`` adds)."""

    def use_replica_group(self, group, name: str) -> None:
        """Hybrid: allreduce this piece's gradients (and, with --sync-bn, BatchNorm sums)
        over ``group``, a handle from StageFactory.join_replica_groups; ``name`` tells its
        allreduces apart from other pieces'."""

    def allreduce_gradients(self) -> None: ...

    def step(self) -> None: ...

    def predict(self, inputs, batch: Batch) -> Any:
        """Forward only: the output tensor for the next piece; on the last piece the batch's
        (loss sum, correct)."""

    def state(self) -> NeutralState:
        """Weights and optimizer state under the stage's own keys (layer 0 = its first)."""

    def load_state(self, state: NeutralState) -> None: ...

    # --mode ps: the server and workers exchange flat float32 vectors.
    def gradient_vector(self) -> np.ndarray: ...

    def set_gradient_vector(self, vector: np.ndarray) -> None: ...

    def parameter_vector(self) -> np.ndarray: ...

    def set_parameter_vector(self, vector: np.ndarray) -> None: ...


class StageFactory(Protocol):
    """A framework's stage class: builds stages, and what must happen before any is built."""

    framework: str

    def __call__(self, place: StagePlace) -> Stage: ...

    @staticmethod
    def set_threads(threads: int, local_rank: int) -> None: ...

    @staticmethod
    def memory_meter(local_rank: int) -> MemoryMeter:
        """How the rank's memory is read: on ``local_rank``'s device, made before any model."""

    @staticmethod
    def make_feed(config: RunConfig, local_rank: int, dataset, reads: Reads) -> Feed:
        """The input path of a rank on ``local_rank``'s device."""

    @staticmethod
    def make_wire(config: RunConfig, local_rank: int) -> Wire:
        """How the rank's activations and gradients reach MPI (--p2p-memory)."""

    recomputes_forward: bool  # a stage before the model's last piece runs its forward again at the backward
                              # unless its place says keep_forward

    @staticmethod
    def keeping_is_faster(specs: Sequence, input_shape: tuple, end: int, config: RunConfig) -> bool:
        """For a framework that recomputes: whether keeping the forward's intermediates runs a
        micro-batch of layers 0..end-1 faster (timed on a throwaway stage)."""

    @staticmethod
    def measure_layer_times(specs: Sequence, input_shape: tuple, batch_size: int) -> list[tuple[float, float]]:
        """(forward, backward) seconds of each layer (--balance time)."""

    @staticmethod
    def measure_step_seconds(specs: Sequence, input_shape: tuple, batch_size: int, recompute: bool = False) -> float:
        """Seconds of one whole-model forward and backward of ``batch_size``, as a run computes
        it (compiled where the framework compiles; ``recompute``: as --recompute does), the mean
        of a few after a warm-up (--mode auto's profile: what the layers' times add up to in one
        call, under the node's load)."""

    @staticmethod
    def measure_step_memory(specs: Sequence, input_shape: tuple, batch_size: int) -> int:
        """Bytes the process grew by over a few whole-model training steps of ``batch_size``
        (--mode auto's profile: what the allocator holds beyond the tensors)."""

    @staticmethod
    def join_replica_groups(stage_ranks: list) -> list:
        """Hybrid, collective, once per rank: join Horovod with one process set per stage
        (``stage_ranks[s]``: stage s's replicas); the sets' handles, in that order."""
