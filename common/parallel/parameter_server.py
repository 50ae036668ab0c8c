"""Parameter-server data parallelism (--mode ps) over mpi4py (a common/core/runner.py Runner).

The design ring-allreduce replaced, kept so users can measure why: rank 0 (the
server) holds the optimizer; every other rank (a worker) computes the gradient
of its share of the global batch and sends it to the server, which sums the
workers' gradients in rank order, takes the optimizer step and sends the new
parameters back to every worker. All of a step's traffic goes through the
server's link (2 x workers x model size), where a ring moves about 2 x model
size per rank whatever the number of ranks.

As in data mode, each worker divides its summed per-sample losses by the
global batch size, so the server's sum is exactly the full-batch mean
gradient. The server computes nothing but the update; BatchNorm running
statistics live on the workers, and checkpoints take the model from worker 1
(parameters identical on every rank, statistics those of one replica, as data
mode saves rank 0's) and the optimizer state from the server.

The runner holds a framework Stage (train_torch/stage.py, train_tf/stage.py)
covering the whole model; the server and workers exchange its flat vectors
(Stage.gradient_vector / parameter_vector and their setters).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from common.core import metrics
from common.core.config import RunConfig
from common.core.runner import Collectives, OpenCheckpoint, StageFactory, StagePlace
from common.data.batches import Batch, Reads
from common.data.datasets import Dataset
from common.model import weights
from common.model.checkpoint import NeutralState
from common.observe.memory import MemoryMeter
from common.observe.timeline import Timeline
from common.parallel import plan
from common.parallel.collectives import MpiCollectives, MpiRunner, node_placement

SERVER = 0
GRADIENT_TAG, PARAMETER_TAG = 11, 12


class ParameterServerRunner(MpiRunner):
    checkpoint_shards = 1

    def __init__(self, config: RunConfig, dataset: Dataset, specs, stage_factory: StageFactory):
        from mpi4py import MPI

        self.framework = stage_factory.framework
        self.comm = MPI.COMM_WORLD
        self.rank, self.world_size = self.comm.rank, self.comm.size
        self.plan = plan.make_plan(config, self.world_size)
        self.server = self.rank == SERVER
        self.primary = self.server  # the server logs and saves
        self.workers = list(range(1, self.world_size))
        self.data_shards, self.data_shard = len(self.workers), max(0, self.rank - 1)
        self.config, self.dataset, self.specs = config, dataset, specs
        self.collectives: Collectives = MpiCollectives(self.comm, SERVER)

        local_rank, self.threads = node_placement(self.comm, config)
        stage_factory.set_threads(self.threads, local_rank)
        self.memory: MemoryMeter = stage_factory.memory_meter(local_rank)  # before any model
        self.reads = Reads(images=not self.server, labels=not self.server)  # the server reads no data
        self.feed = stage_factory.make_feed(config, local_rank, dataset, self.reads)
        # The whole model is one stage on every rank.
        self.stage = stage_factory(StagePlace(tuple(specs), dataset.image_shape, 0, len(specs), True, True,
                                              config, local_rank, self.feed))
        self.ranges: Sequence[tuple[int, int]] = [(0, len(specs))]
        # The workers alone, to average their BatchNorm running statistics (COMM_NULL on the server).
        self.worker_comm = self.comm.Split(MPI.UNDEFINED if self.server else 0, self.rank)
        self.parameter_count = self.stage.parameter_vector().size  # the length of every message
        self.timeline = Timeline()
        self.layout: Sequence[str] = [f"parameter server: rank {SERVER} sums the gradients and updates "
                       f"{self.parameter_count:,} parameters; "
                       f"workers {self.workers} compute gradients on {len(self.workers)} shares of each batch"]

    def set_lr(self, value: float) -> None:
        self.stage.set_lr(value)

    @property
    def track_label(self) -> str:
        return f"rank {self.rank}: {'server' if self.server else 'worker'}"

    def train_step(self, batch: Batch, global_count: int) -> np.ndarray:
        with self.timeline.span("step", "step"):
            return self._serve_step() if self.server else self._work_step(batch, global_count)

    def _work_step(self, batch: Batch, global_count: int) -> np.ndarray:
        stage, span = self.stage, self.timeline.span
        stage.zero_grad()
        meter = metrics.Meter()
        if batch.count:
            with span("forward", "forward", microbatch=0):
                _, (loss_sum, correct) = stage.forward(0, None, batch, 1.0 / global_count)
            with span("backward", "backward", microbatch=0):
                stage.backward(0, None)
            meter.add(loss_sum, correct, batch.scored)
        # An empty share (last batch smaller than the workers) sends a zero gradient.
        with span("send gradient", "send"):
            self.comm.Send(np.ascontiguousarray(stage.gradient_vector(), dtype=np.float32), dest=SERVER,
                           tag=GRADIENT_TAG)
        parameters = np.empty(self.parameter_count, dtype=np.float32)
        with span("receive parameters", "wait"):
            self.comm.Recv(parameters, source=SERVER, tag=PARAMETER_TAG)
        stage.set_parameter_vector(parameters)
        return meter.sums

    def _serve_step(self) -> np.ndarray:
        from mpi4py import MPI

        span = self.timeline.span
        buffers = {worker: np.empty(self.parameter_count, dtype=np.float32) for worker in self.workers}
        requests = [self.comm.Irecv(buffers[worker], source=worker, tag=GRADIENT_TAG) for worker in self.workers]
        with span("receive gradients", "wait"):
            MPI.Request.Waitall(requests)
        with span("optimizer step", "optimizer"):
            total = np.zeros(self.parameter_count, dtype=np.float32)
            for worker in self.workers:  # a fixed order: the same sum every run
                total += buffers[worker]
            self.stage.zero_grad()
            self.stage.set_gradient_vector(total)
            self.stage.step()
        with span("send parameters", "send"):
            parameters = np.ascontiguousarray(self.stage.parameter_vector(), dtype=np.float32)
            MPI.Request.Waitall([self.comm.Isend(parameters, dest=worker, tag=PARAMETER_TAG)
                                 for worker in self.workers])
        return metrics.Meter().sums

    def share_batch_norm_statistics(self) -> None:
        """The workers' BatchNorm running statistics replaced by their mean, before every
        evaluation and save, as data mode's replicas do: each worker tracked its own share of
        every batch, and the mean is what one process would have tracked over the whole."""
        if self.server or len(self.workers) < 2:
            return
        state = self.stage.state()
        keys = sorted(key for key in state.weights if weights.is_batch_norm_statistic(key))
        if not keys:
            return
        local = np.concatenate([state.weights[key].ravel() for key in keys]).astype(np.float64)
        total = np.empty_like(local)
        self.worker_comm.Allreduce(local, total)  # MPI: the sum over the workers
        mean, offset = total / len(self.workers), 0
        for key in keys:
            size = state.weights[key].size
            state.weights[key] = mean[offset:offset + size].reshape(state.weights[key].shape).astype(np.float32)
            offset += size
        self.stage.load_state(NeutralState(state.weights, {}))

    def evaluate(self, batches) -> np.ndarray:
        self.share_batch_norm_statistics()
        meter = metrics.Meter()
        for batch in batches:
            if not self.server:  # the server reads no data: its batches are empty of it
                loss_sum, correct = self.stage.predict(None, batch)
                meter.add(loss_sum, correct, batch.scored)
        return meter.sums

    def checkpoint_shard(self) -> tuple[int, NeutralState] | None:
        """The server writes its optimizer state with worker 1's model (the workers' mean
        BatchNorm statistics included)."""
        self.share_batch_norm_statistics()
        if self.rank == self.workers[0]:
            self.comm.send(self.stage.state().weights, dest=SERVER, tag=PARAMETER_TAG)
        if not self.server:
            return None
        model = self.comm.recv(source=self.workers[0], tag=PARAMETER_TAG)
        return 0, NeutralState(model, self.stage.state().optimizer)

    def load_state(self, open_checkpoint: OpenCheckpoint | None, with_optimizer: bool) -> None:
        """Every rank reads the whole model; the server also the optimizer state it keeps."""
        if open_checkpoint is None:
            return  # every rank already holds the seed's initial weights
        keys = weights.expected_keys(self.specs, self.dataset.image_shape)
        optimizer = self.config.optimizer if with_optimizer and self.server else None
        self.stage.load_state(open_checkpoint().state(keys, optimizer))
