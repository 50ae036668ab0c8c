"""Model-parallel and hybrid training: the pipeline runner (a common/core/runner.py Runner).

Each rank runs one stage (a contiguous slice of the layer specs) for one
replica. This runner owns everything that is not framework arithmetic: the
plan and partition, walking the schedule (common/parallel/schedule.py), moving
activations forward and their gradients backward (common/parallel/p2p.py), evaluation
through the pipeline, and checkpoint shards (each stage of replica 0 writes its
own layers). It *holds* a framework Stage (train_torch/stage.py,
train_tf/stage.py) that does one stage's arithmetic.

The loss lives on the last stage, the only one that needs labels: summed
per-sample losses divided once by the global batch size, so the micro-batch
gradients (and, in hybrid mode, the replicas' sums) add up to the full-batch
mean gradient. Micro-batches are np.array_split of the replica's share, the
cut data mode's --accumulation-steps makes: each micro-batch is normalised by
its own BatchNorm statistics and the running statistics move once per
micro-batch, exactly as in data mode with the same accumulation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from common.core import metrics
from common.core.config import Balance, RunConfig
from common.core.runner import Collectives, OpenCheckpoint, Stage, StageFactory, StagePlace
from common.data.batches import Batch, Reads
from common.data.datasets import Dataset
from common.model import networks, weights
from common.model.checkpoint import NeutralState
from common.observe.memory import MemoryMeter
from common.observe.timeline import Timeline
from common.parallel import p2p, plan, schedule
from common.parallel.collectives import MpiCollectives, MpiRunner, node_placement


@dataclass
class Piece:
    """One contiguous piece of the model that this rank computes: its stage's only one,
    or with --schedule interleaved one of its --virtual-stages chunks."""
    chunk: int                       # index among this rank's pieces (the schedule's Action.chunk)
    virtual: int                     # index among the model's pieces
    start: int                       # its layers: start..end-1
    end: int
    first: bool                      # the model's first piece (reads the batch)
    last: bool                       # the model's last piece (computes the loss)
    previous: int | None          # the rank its input comes from (and its input gradient goes to)
    next: int | None              # the rank its output goes to (and its output gradient comes from)
    in_shape: tuple
    out_shape: tuple
    stage: Stage


class PipelineRunner(MpiRunner):
    def __init__(self, config: RunConfig, dataset: Dataset, specs, stage_factory: StageFactory):
        from mpi4py import MPI

        self.framework = stage_factory.framework
        self.comm = MPI.COMM_WORLD
        self.rank, self.world_size = self.comm.rank, self.comm.size
        self.plan = plan.make_plan(config, self.world_size)
        self.stage_index, self.replica = self.plan.stage_of(self.rank), self.plan.replica_of(self.rank)
        self.primary_rank = self.plan.rank_of(self.plan.pp - 1, 0)  # metrics live on the last stage
        self.primary = self.rank == self.primary_rank
        self.data_shards, self.data_shard = self.plan.dp, self.replica
        self.checkpoint_shards = self.plan.pp  # one per stage (all its pieces), written by replica 0
        self.config, self.dataset, self.specs = config, dataset, specs
        self.collectives: Collectives = MpiCollectives(self.comm, self.primary_rank)

        local_rank, self.threads = node_placement(self.comm, config)
        stage_factory.set_threads(self.threads, local_rank)
        self.memory: MemoryMeter = stage_factory.memory_meter(local_rank)  # before any model
        self.keep_forward = self._keeping_is_faster(stage_factory)
        self.stashes_inputs_only = stage_factory.recomputes_forward and not self.keep_forward
        costs, last_costs = self._layer_costs(stage_factory)
        self.layer_costs: Sequence[float] = costs
        self.last_piece_costs: Sequence[float] = last_costs if last_costs != costs else ()
        self.ranges: Sequence[tuple[int, int]] = plan.partition(costs, self.plan.pp, config.split, self.plan.chunks,
                                                                config.microbatches, last_costs)
        virtual = [self.plan.virtual_stage(self.stage_index, chunk) for chunk in range(self.plan.chunks)]
        # The model's first piece reads the images, its last the labels.
        self.reads = Reads(images=0 in virtual, labels=self.plan.virtual_stages - 1 in virtual)
        self.feed = stage_factory.make_feed(config, local_rank, dataset, self.reads)
        self.layout: Sequence[str] = [f"{self._piece_name(v)}: layers {a}-{b - 1} "
                       f"({', '.join(type(x).__name__ for x in specs[a:b])}), "
                       f"cost {sum((last_costs if b == len(specs) else costs)[a:b]):.3g} "
                       f"({config.balance}), ranks {self.plan.stage_ranks(self.plan.place_of(v)[0])}"
                       for v, (a, b) in enumerate(self.ranges)]
        self.pieces = [self._make_piece(chunk, stage_factory, local_rank) for chunk in range(self.plan.chunks)]
        self.transport = p2p.Transport(self.comm, stage_factory.make_wire(config, local_rank), self.plan.chunks)
        self.layout.append(f"activations and gradients via {self.transport.wire.description} "
                           f"(--p2p-memory {config.p2p_memory})")
        self.timeline = Timeline()
        if self.plan.dp > 1:
            # Horovod: one process set per stage; each piece allreduces over its stage's replicas.
            groups = stage_factory.join_replica_groups([self.plan.stage_ranks(s) for s in range(self.plan.pp)])
            for piece in self.pieces:
                piece.stage.use_replica_group(groups[self.stage_index], f"piece{piece.virtual}_gradients")

    def _piece_name(self, virtual: int) -> str:
        stage, chunk = self.plan.place_of(virtual)
        return f"stage {stage}" if self.plan.chunks == 1 else f"stage {stage} chunk {chunk} (piece {virtual})"

    def _make_piece(self, chunk: int, stage_factory: StageFactory, local_rank: int) -> Piece:
        virtual = self.plan.virtual_stage(self.stage_index, chunk)
        start, end = self.ranges[virtual]
        first, last = virtual == 0, virtual == self.plan.virtual_stages - 1
        shapes = networks.layer_shapes(self.specs, self.dataset.image_shape)

        def rank_of(other):
            return self.plan.rank_of(self.plan.place_of(other)[0], self.replica)
        stage = stage_factory(StagePlace(tuple(self.specs), self.dataset.image_shape, start, end, first, last,
                                         self.config, local_rank, self.feed, self.keep_forward))
        return Piece(chunk, virtual, start, end, first, last, None if first else rank_of(virtual - 1),
                     None if last else rank_of(virtual + 1), shapes[start], shapes[end], stage)

    def _keeping_is_faster(self, stage_factory: StageFactory) -> bool:
        """Timed once on one rank, on the model's first piece as FLOPs cut it, and shared: every
        rank's stages keep their forward or every rank's recompute it, and the cut charges
        the recompute only where it is paid."""
        if not (stage_factory.recomputes_forward and plan.forward_may_be_kept(self.config.schedule, self.plan.pp)):
            return False
        keep = None
        if self.rank == self.primary_rank:
            flops = [cost.flops for cost in networks.layer_costs(self.specs, self.dataset.image_shape)]
            (_, end), *_ = plan.partition(flops, self.plan.virtual_stages)
            keep = stage_factory.keeping_is_faster(self.specs, self.dataset.image_shape, end, self.config)
        return self.comm.bcast(keep, root=self.primary_rank)

    def _layer_costs(self, stage_factory: StageFactory) -> tuple[list, list]:
        """Each layer's cost in a piece before the model's last, and in the last."""
        if self.config.balance == Balance.TIME:
            # Measured once on one rank and shared: every rank must cut the same stages.
            times = None
            if self.rank == self.primary_rank:
                times = stage_factory.measure_layer_times(
                    self.specs, self.dataset.image_shape, max(1, self.config.batch_size // self.config.microbatches))
            times = self.comm.bcast(times, root=self.primary_rank)
            return plan.timed_costs(times, self.stashes_inputs_only)
        costs = networks.layer_costs(self.specs, self.dataset.image_shape)
        flops_or_params = [getattr(cost, self.config.balance) for cost in costs]  # --balance flops or params
        return flops_or_params, flops_or_params

    def set_lr(self, value: float) -> None:
        for piece in self.pieces:
            piece.stage.set_lr(value)

    # --- one optimizer step -------------------------------------------------------

    @property
    def track_label(self) -> str:
        return f"rank {self.rank}: stage {self.stage_index}, replica {self.replica}"

    def train_step(self, batch: Batch, global_count: int) -> np.ndarray:
        with self.timeline.span("step", "step"):
            return self._train_step(batch, global_count)

    def _train_step(self, batch: Batch, global_count: int) -> np.ndarray:
        span = self.timeline.span
        batch = self._with_blanks_of_the_first_stage(batch)
        for piece in self.pieces:
            piece.stage.zero_grad()
        microbatches = [part for part in batch.parts(self.config.microbatches) if part.count]
        for m, part in enumerate(microbatches):
            for piece in self.pieces:
                if not piece.first:
                    self.transport.post_receive(p2p.ACTIVATION, m, piece.chunk, piece.previous,
                                                (part.count, *piece.in_shape))
                if not piece.last:
                    self.transport.post_receive(p2p.GRADIENT, m, piece.chunk, piece.next,
                                                (part.count, *piece.out_shape))
        meter = metrics.Meter()
        for action in schedule.compute_actions(self.config.schedule, self.stage_index, self.plan.pp,
                                               len(microbatches), self.plan.chunks):
            m, piece = action.microbatch, self.pieces[action.chunk]
            if action.kind == schedule.FORWARD:
                self._forward(piece, m, microbatches[m], global_count, meter)
            elif action.kind == schedule.WEIGHT_GRADIENT:
                with self.timeline.span("weight gradient", "backward", microbatch=m, chunk=piece.chunk):
                    piece.stage.backward_weight(m)
            else:
                self._backward(piece, m, split=action.kind == schedule.INPUT_GRADIENT)
        with span("wait for sends", "wait"):
            self.transport.finish()
        for piece in self.pieces:
            if self.plan.dp > 1 and piece.stage.has_parameters:
                with span("allreduce", "allreduce", chunk=piece.chunk):
                    piece.stage.allreduce_gradients()
        for piece in self.pieces:
            if piece.stage.has_parameters:
                with span("optimizer step", "optimizer", chunk=piece.chunk):
                    piece.stage.step()
        return meter.sums  # zeros except on last stages

    def _forward(self, piece: Piece, m: int, part: Batch, global_count: int, meter: metrics.Meter) -> None:
        span = self.timeline.span
        inputs = None
        if not piece.first:
            with span("receive activation", "wait", microbatch=m, chunk=piece.chunk):
                inputs = self.transport.receive(p2p.ACTIVATION, m, piece.chunk)
        with span("forward", "forward", microbatch=m, chunk=piece.chunk):
            output, (loss_sum, correct) = piece.stage.forward(m, inputs, part, 1.0 / global_count)
        if piece.last:
            meter.add(loss_sum, correct, part.scored)
        else:
            with span("send activation", "send", microbatch=m, chunk=piece.chunk):
                self.transport.send(output, p2p.ACTIVATION, m, self._chunk_of(piece.virtual + 1), piece.next)

    def _chunk_of(self, virtual: int) -> int:
        """The receiving piece's chunk: with the micro-batch and the kind, its message's tag."""
        return self.plan.place_of(virtual)[1]

    def _backward(self, piece: Piece, m: int, split: bool) -> None:
        """A whole backward, or (``split``, --schedule zb) its input-gradient part, whose
        weight-gradient part a later action runs."""
        span = self.timeline.span
        gradient = None
        if not piece.last:
            with span("receive gradient", "wait", microbatch=m, chunk=piece.chunk):
                gradient = self.transport.receive(p2p.GRADIENT, m, piece.chunk)
        with span("input gradient" if split else "backward", "backward", microbatch=m, chunk=piece.chunk):
            input_gradient = (piece.stage.backward_input if split else piece.stage.backward)(m, gradient)
        if not piece.first:
            with span("send gradient", "send", microbatch=m, chunk=piece.chunk):
                self.transport.send(input_gradient, p2p.GRADIENT, m, self._chunk_of(piece.virtual - 1), piece.previous)

    # --- evaluation, forward only through the pipeline ---------------------------

    def evaluate(self, batches) -> np.ndarray:
        self.share_batch_norm_statistics()
        meter = metrics.Meter()
        for batch in batches:
            batch = self._with_blanks_of_the_first_stage(batch)
            for piece in self.pieces:  # in model order; each piece's input comes from the one before
                inputs = None
                if not piece.first:
                    inputs = self.transport.receive_now(piece.previous, (batch.count, *piece.in_shape),
                                                        p2p.EVALUATION_TAG + piece.virtual)
                output = piece.stage.predict(inputs, batch)
                if piece.last:
                    loss_sum, correct = output  # the last piece's output is the batch's sums
                    meter.add(loss_sum, correct, batch.scored)
                else:
                    self.transport.send_now(output, piece.next, p2p.EVALUATION_TAG + piece.virtual + 1)
        return meter.sums

    def _with_blanks_of_the_first_stage(self, batch: Batch) -> Batch:
        """--skip-bad-images: the first stage reads the images, the last scores the labels, so
        the first tells the last which samples it left blank (one small message a batch)."""
        if not (self.config.skip_bad_images and self.dataset.streamed):
            return batch
        first, last = (self.plan.rank_of(stage, self.replica) for stage in (0, self.plan.pp - 1))
        if first == last:
            return batch
        if self.rank == first:
            blank = batch.blank if batch.blank is not None else np.zeros(batch.count, dtype=bool)
            self.comm.Send(np.ascontiguousarray(blank, dtype=np.uint8), dest=last, tag=p2p.BLANK_TAG)
        elif self.rank == last:
            received = np.empty(batch.count, dtype=np.uint8)
            self.comm.Recv(received, source=first, tag=p2p.BLANK_TAG)
            return replace(batch, blank=received.astype(bool) if received.any() else None)
        return batch

    def share_batch_norm_statistics(self) -> None:
        for piece in self.pieces:
            piece.stage.share_batch_norm_statistics()

    # --- checkpoints: each stage reads and writes its own layers -----------------

    def checkpoint_shard(self) -> tuple[int, NeutralState] | None:
        self.share_batch_norm_statistics()
        if self.replica != 0:
            return None  # replicas hold the same weights; replica 0's are saved
        return self.stage_index, NeutralState.union([piece.stage.state().shifted(piece.start)
                                                     for piece in self.pieces])

    def load_state(self, open_checkpoint: OpenCheckpoint | None, with_optimizer: bool) -> None:
        if open_checkpoint is None:
            return  # every rank already holds the seed's initial weights
        checkpoint = open_checkpoint()
        expected = weights.expected_keys(self.specs, self.dataset.image_shape)
        for piece in self.pieces:
            state = checkpoint.state(weights.layer_keys(expected, piece.start, piece.end),
                                     self.config.optimizer if with_optimizer else None)
            piece.stage.load_state(state.shifted(-piece.start))
