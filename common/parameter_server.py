"""Parameter-server data parallelism (--mode ps) over mpi4py: the runner for common/training.py.

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

A framework's stage class (train_torch/pipeline.py, train_tf/pipeline.py)
supplies the arithmetic; besides the stage interface of common/pipeline.py
this mode uses:

    gradient_vector() / set_gradient_vector(v)     all parameter gradients as one float32 vector
    parameter_vector() / set_parameter_vector(v)   all parameters as one float32 vector
"""

import os

import numpy as np

from common import data, metrics, plan
from common.pipeline import PipelineRunner, softmax_cross_entropy_sums

SERVER = 0
GRADIENT_TAG, PARAMETER_TAG = 11, 12


class ParameterServerRunner(PipelineRunner):
    def __init__(self, config, dataset, specs):
        from mpi4py import MPI

        self.comm = MPI.COMM_WORLD
        self.rank, self.world_size = self.comm.rank, self.comm.size
        self.plan = plan.make_plan(config, self.world_size)
        self.server = self.rank == SERVER
        self.primary_rank, self.primary = SERVER, self.server  # the server logs and saves
        self.workers = list(range(1, self.world_size))
        self.data_shards, self.data_shard = len(self.workers), max(0, self.rank - 1)
        self.config, self.dataset, self.specs = config, dataset, specs

        node = self.comm.Split_type(MPI.COMM_TYPE_SHARED)
        self.local_rank = node.rank
        self.threads = config.threads or max(1, (os.cpu_count() or 1) // node.size)
        self.set_threads(self.threads)

        # The whole model is one "stage" on every rank.
        self.stage, self.replica, self.first, self.last = 0, self.data_shard, True, True
        self.start, self.end = 0, len(specs)
        self.in_shape = dataset.image_shape
        self.build_stage(self.start, self.end)
        self.parameter_count = self.parameter_vector().size  # the length of every message
        self.layout = [f"parameter server: rank {SERVER} sums the gradients and updates "
                       f"{self.parameter_count:,} parameters; "
                       f"workers {self.workers} compute gradients on {len(self.workers)} shares of each batch"]

    def train_step(self, indices, global_count):
        if self.server:
            return self._serve_step()
        self.zero_grad()
        meter = metrics.Meter()
        if len(indices):
            _, (loss_sum, correct) = self.forward(0, self.dataset.x_train[indices], self.dataset.y_train[indices],
                                                  1.0 / global_count)
            self.backward(0, None)
            meter.add(loss_sum, correct, len(indices))
        # An empty share (last batch smaller than the workers) sends a zero gradient.
        self.comm.Send(np.ascontiguousarray(self.gradient_vector(), dtype=np.float32), dest=SERVER,
                       tag=GRADIENT_TAG)
        parameters = np.empty(self.parameter_count, dtype=np.float32)
        self.comm.Recv(parameters, source=SERVER, tag=PARAMETER_TAG)
        self.set_parameter_vector(parameters)
        return meter.sums

    def _serve_step(self):
        from mpi4py import MPI

        buffers = {worker: np.empty(self.parameter_count, dtype=np.float32) for worker in self.workers}
        requests = [self.comm.Irecv(buffers[worker], source=worker, tag=GRADIENT_TAG) for worker in self.workers]
        MPI.Request.Waitall(requests)
        total = np.zeros(self.parameter_count, dtype=np.float32)
        for worker in self.workers:  # a fixed order: the same sum every run
            total += buffers[worker]
        self.zero_grad()
        self.set_gradient_vector(total)
        self.step()
        parameters = np.ascontiguousarray(self.parameter_vector(), dtype=np.float32)
        MPI.Request.Waitall([self.comm.Isend(parameters, dest=worker, tag=PARAMETER_TAG)
                             for worker in self.workers])
        return metrics.Meter().sums

    def evaluate(self, x, y, batch_size=512):
        meter = metrics.Meter()
        if self.server:
            return meter.sums
        for indices in data.batched(data.eval_shard(len(y), len(self.workers), self.data_shard), batch_size):
            logits = self.predict(x[indices])
            meter.add(*softmax_cross_entropy_sums(logits, y[indices]), len(indices))
        return meter.sums

    def gather_state(self):
        """The server's optimizer state with worker 1's model (its BatchNorm statistics included)."""
        if self.rank == self.workers[0]:
            self.comm.send(self.stage_state()["weights"], dest=SERVER, tag=PARAMETER_TAG)
        if not self.primary:
            return None
        model = self.comm.recv(source=self.workers[0], tag=PARAMETER_TAG)
        return {"weights": model, "optimizer": self.stage_state()["optimizer"]}

