"""Model-parallel and hybrid training: the pipeline runner (a common/runner.py Runner).

Each rank runs one stage (a contiguous slice of the layer specs) for one
replica. This runner owns everything that is not framework arithmetic: the
plan and partition, walking the schedule (common/schedule.py), moving
activations forward and their gradients backward (common/p2p.py), evaluation
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

from typing import Optional

import numpy as np

from common import data, metrics, models, p2p, plan, schedule, weights
from common.checkpoint import NeutralState
from common.config import RunConfig
from common.data import Dataset
from common.runner import MpiCollectives, OpenCheckpoint, StageFactory, StagePlace, node_placement
from common.timeline import Timeline, gather_timeline, start_timeline

EVAL_TAG = 1 << 20  # above every training tag (2 * micro-batch + kind)


class PipelineRunner:
    def __init__(self, config: RunConfig, dataset: Dataset, specs, stage_factory: StageFactory):
        from mpi4py import MPI

        self.framework = stage_factory.framework
        self.comm = MPI.COMM_WORLD
        self.rank, self.world_size = self.comm.rank, self.comm.size
        self.plan = plan.make_plan(config, self.world_size)
        self.stage_index, self.replica = self.plan.stage_of(self.rank), self.plan.replica_of(self.rank)
        self.previous, self.next = self.plan.neighbours(self.rank)
        self.first, self.last = self.stage_index == 0, self.stage_index == self.plan.pp - 1
        self.primary_rank = self.plan.rank_of(self.plan.pp - 1, 0)  # metrics live on the last stage
        self.primary = self.rank == self.primary_rank
        self.data_shards, self.data_shard = self.plan.dp, self.replica
        self.checkpoint_shards = self.plan.pp  # one per stage, written by replica 0
        self.config, self.dataset, self.specs = config, dataset, specs
        self.collectives = MpiCollectives(self.comm, self.primary_rank)

        local_rank, self.threads = node_placement(self.comm, config)
        stage_factory.set_threads(self.threads, local_rank)
        costs = self._layer_costs(stage_factory)
        self.ranges = plan.partition(costs, self.plan.pp, config.split)
        self.start, self.end = self.ranges[self.stage_index]
        shapes = models.layer_shapes(specs, dataset.image_shape)
        self.in_shape, self.out_shape = shapes[self.start], shapes[self.end]
        self.layout = [f"stage {s}: layers {a}-{b - 1} ({', '.join(type(x).__name__ for x in specs[a:b])}), "
                       f"cost {sum(costs[a:b]):.3g} ({config.balance}), ranks {self.plan.stage_ranks(s)}"
                       for s, (a, b) in enumerate(self.ranges)]
        self.stage = stage_factory(StagePlace(tuple(specs), dataset.image_shape, self.start, self.end,
                                              self.first, self.last, config, local_rank))
        self.transport = p2p.Transport(self.comm)
        self.timeline = Timeline()
        if self.plan.dp > 1:
            self.stage.init_replica_allreduce([self.plan.stage_ranks(s) for s in range(self.plan.pp)],
                                              self.stage_index)

    def _layer_costs(self, stage_factory: StageFactory) -> list:
        if self.config.balance == "time":
            # Measured once on one rank and shared: every rank must cut the same stages.
            times = None
            if self.rank == self.primary_rank:
                times = stage_factory.measure_layer_times(
                    self.specs, self.dataset.image_shape, max(1, self.config.batch_size // self.config.microbatches))
            return self.comm.bcast(times, root=self.primary_rank)
        column = {"flops": 3, "params": 2}[self.config.balance]
        return [cost[column] for cost in models.layer_costs(self.specs, self.dataset.image_shape)]

    def set_lr(self, value: float) -> None:
        self.stage.set_lr(value)

    # --- one optimizer step -------------------------------------------------------

    def start_timeline(self) -> None:
        self.timeline = start_timeline(self.comm, self.config)

    def write_timeline(self) -> None:
        gather_timeline(self.comm, self.timeline, self.config.timeline,
                        f"rank {self.rank}: stage {self.stage_index}, replica {self.replica}")

    def train_step(self, indices: np.ndarray, global_count: int) -> np.ndarray:
        with self.timeline.span("step", "step"):
            return self._train_step(indices, global_count)

    def _train_step(self, indices: np.ndarray, global_count: int) -> np.ndarray:
        stage, span = self.stage, self.timeline.span
        stage.zero_grad()
        microbatches = [chunk for chunk in np.array_split(indices, self.config.microbatches) if len(chunk)]
        for m, chunk in enumerate(microbatches):
            if not self.first:
                self.transport.post_receive(p2p.ACTIVATION, m, self.previous, (len(chunk), *self.in_shape))
            if not self.last:
                self.transport.post_receive(p2p.GRADIENT, m, self.next, (len(chunk), *self.out_shape))
        meter = metrics.Meter()
        for action in schedule.compute_actions(self.config.schedule, self.stage_index, self.plan.pp,
                                               len(microbatches)):
            m = action.microbatch
            if action.kind == schedule.FORWARD:
                chunk = microbatches[m]
                if self.first:
                    with span("load batch", "data", microbatch=m):
                        inputs = self.dataset.x_train[chunk]
                else:
                    with span("receive activation", "wait", microbatch=m):
                        inputs = self.transport.receive(p2p.ACTIVATION, m)
                labels = self.dataset.y_train[chunk] if self.last else None
                with span("forward", "forward", microbatch=m):
                    output, (loss_sum, correct) = stage.forward(m, inputs, labels, 1.0 / global_count)
                if self.last:
                    meter.add(loss_sum, correct, len(chunk))
                else:
                    with span("send activation", "send", microbatch=m):
                        self.transport.send(output, p2p.ACTIVATION, m, self.next)
            else:
                gradient = None
                if not self.last:
                    with span("receive gradient", "wait", microbatch=m):
                        gradient = self.transport.receive(p2p.GRADIENT, m)
                with span("backward", "backward", microbatch=m):
                    input_gradient = stage.backward(m, gradient)
                if not self.first:
                    with span("send gradient", "send", microbatch=m):
                        self.transport.send(input_gradient, p2p.GRADIENT, m, self.previous)
        with span("wait for sends", "wait"):
            self.transport.finish()
        if self.plan.dp > 1 and stage.has_parameters:
            with span("allreduce", "allreduce"):
                stage.allreduce_gradients()
        if stage.has_parameters:
            with span("optimizer step", "optimizer"):
                stage.step()
        return meter.sums  # zeros except on last stages

    # --- evaluation, forward only through the pipeline ---------------------------

    def evaluate(self, x: np.ndarray, y: np.ndarray, batch_size: int = 512) -> np.ndarray:
        self.stage.share_batch_norm_statistics()
        meter = metrics.Meter()
        for indices in data.batched(data.eval_shard(len(y), self.plan.dp, self.replica), batch_size):
            if self.first:
                inputs = x[indices]
            else:
                inputs = np.empty((len(indices), *self.in_shape), dtype=np.float32)
                self.comm.Recv(inputs, source=self.previous, tag=EVAL_TAG)
            output = self.stage.predict(inputs)
            if self.last:
                meter.add(*metrics.softmax_cross_entropy_sums(output, y[indices]), len(indices))
            else:
                self.comm.Send(np.ascontiguousarray(output, dtype=np.float32), dest=self.next, tag=EVAL_TAG)
        return meter.sums

    # --- checkpoints: each stage reads and writes its own layers -----------------

    def checkpoint_shard(self) -> Optional[tuple[int, NeutralState]]:
        self.stage.share_batch_norm_statistics()
        if self.replica != 0:
            return None  # replicas hold the same weights; replica 0's are saved
        return self.stage_index, self.stage.state().shifted(self.start)

    def load_state(self, open_checkpoint: Optional[OpenCheckpoint], with_optimizer: bool) -> None:
        if open_checkpoint is None:
            return  # every rank already holds the seed's initial weights
        keys = weights.layer_keys(weights.expected_keys(self.specs, self.dataset.image_shape), self.start, self.end)
        state = open_checkpoint().state(keys, self.config.optimizer if with_optimizer else None)
        self.stage.load_state(state.shifted(-self.start))
