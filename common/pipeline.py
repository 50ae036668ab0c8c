"""Model-parallel and hybrid training: the runner for common/training.py.

Each rank runs one stage (a contiguous slice of the layer specs) for one
replica. This class owns everything that is not framework arithmetic: the
plan and partition, walking the schedule (common/schedule.py), moving
activations forward and their gradients backward (common/p2p.py), evaluation
through the pipeline, and gathering/scattering the whole model's state so
checkpoints are the same files as in data mode. A framework's subclass
(train_torch/pipeline.py, train_tf/pipeline.py) supplies the stage:

    framework, checkpoint_extension
    set_threads(n)                        before the framework runs anything (and picks the GPU
                                          of self.local_rank where there is one)
    measure_layer_times(batch_size)       forward + backward seconds per layer
    build_stage(start, end)               the stage's layers with the seed's weights
    init_stage_allreduce(stage_sets)      hybrid: Horovod with one process set per stage
    has_parameters
    zero_grad(), set_lr(v), step()
    forward(m, inputs, labels, scale)     -> (output to send or None, (loss sum, correct))
                                             labels/scale only on the last stage
    backward(m, output_gradient)          -> gradient for the previous stage, or None on stage 0
    allreduce_gradients()                 hybrid: sum over this stage's replicas
    predict(inputs)                       forward only, numpy in, numpy out
    stage_state() / load_stage_state(s)   {"weights", "optimizer"} in the neutral layout
    save_whole(path, position, architecture, state), load_whole(path, architecture) -> (position, state)
    read_weights(path, architecture)      neutral weights of either framework's checkpoint

The loss lives on the last stage, the only one that needs labels: summed
per-sample losses divided once by the global batch size, so the micro-batch
gradients (and, in hybrid mode, the replicas' sums) add up to the full-batch
mean gradient. Micro-batches are np.array_split of the replica's share, the
cut data mode's --accumulation-steps makes: each micro-batch is normalised by
its own BatchNorm statistics and the running statistics move once per
micro-batch, exactly as in data mode with the same accumulation.
"""

import os

import numpy as np

from common import data, metrics, models, p2p, plan, schedule, weights

EVAL_TAG = 1 << 20  # above every training tag (2 * micro-batch + kind)


def softmax_cross_entropy_sums(logits, labels):
    """(summed loss, correct count) of a batch of logits, in float64."""
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probabilities = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    loss = -log_probabilities[np.arange(len(labels)), labels].sum()
    return float(loss), float((logits.argmax(axis=1) == labels).sum())


class PipelineRunner:
    def __init__(self, config, dataset, specs):
        from mpi4py import MPI

        self.comm = MPI.COMM_WORLD
        self.rank, self.world_size = self.comm.rank, self.comm.size
        self.plan = plan.make_plan(config, self.world_size)
        self.stage, self.replica = self.plan.stage_of(self.rank), self.plan.replica_of(self.rank)
        self.previous, self.next = self.plan.neighbours(self.rank)
        self.first, self.last = self.stage == 0, self.stage == self.plan.pp - 1
        self.primary_rank = self.plan.rank_of(self.plan.pp - 1, 0)  # metrics live on the last stage
        self.primary = self.rank == self.primary_rank
        self.data_shards, self.data_shard = self.plan.dp, self.replica
        self.config, self.dataset, self.specs = config, dataset, specs

        node = self.comm.Split_type(MPI.COMM_TYPE_SHARED)
        self.local_rank = node.rank  # picks this rank's GPU, where there are GPUs
        self.threads = config.threads or max(1, (os.cpu_count() or 1) // node.size)
        self.set_threads(self.threads)

        costs = self._layer_costs()
        self.ranges = plan.partition(costs, self.plan.pp, config.split)
        self.start, self.end = self.ranges[self.stage]
        shapes = models.layer_shapes(specs, dataset.image_shape)
        self.in_shape, self.out_shape = shapes[self.start], shapes[self.end]
        self.layout = [f"stage {s}: layers {a}-{b - 1} ({', '.join(type(x).__name__ for x in specs[a:b])}), "
                       f"cost {sum(costs[a:b]):.3g} ({config.balance}), ranks {self.plan.stage_ranks(s)}"
                       for s, (a, b) in enumerate(self.ranges)]
        self.build_stage(self.start, self.end)
        self.transport = p2p.Transport(self.comm)
        if self.plan.dp > 1:
            self.init_stage_allreduce([self.plan.stage_ranks(s) for s in range(self.plan.pp)])

    def _layer_costs(self):
        if self.config.balance == "time":
            # Measured once on one rank and shared: every rank must cut the same stages.
            times = None
            if self.rank == self.primary_rank:
                times = self.measure_layer_times(max(1, self.config.batch_size // self.config.microbatches))
            return self.comm.bcast(times, root=self.primary_rank)
        column = {"flops": 3, "params": 2}[self.config.balance]
        return [cost[column] for cost in models.layer_costs(self.specs, self.dataset.image_shape)]

    # --- one optimizer step -------------------------------------------------------

    def train_step(self, indices, global_count):
        self.zero_grad()
        microbatches = [chunk for chunk in np.array_split(indices, self.config.microbatches) if len(chunk)]
        for m, chunk in enumerate(microbatches):
            if not self.first:
                self.transport.post_receive(p2p.ACTIVATION, m, self.previous, (len(chunk), *self.in_shape))
            if not self.last:
                self.transport.post_receive(p2p.GRADIENT, m, self.next, (len(chunk), *self.out_shape))
        meter = metrics.Meter()
        for action in schedule.compute_actions(self.config.schedule, self.stage, self.plan.pp, len(microbatches)):
            m = action.microbatch
            if action.kind == schedule.FORWARD:
                chunk = microbatches[m]
                inputs = self.dataset.x_train[chunk] if self.first else self.transport.receive(p2p.ACTIVATION, m)
                labels = self.dataset.y_train[chunk] if self.last else None
                output, (loss_sum, correct) = self.forward(m, inputs, labels, 1.0 / global_count)
                if self.last:
                    meter.add(loss_sum, correct, len(chunk))
                else:
                    self.transport.send(output, p2p.ACTIVATION, m, self.next)
            else:
                gradient = None if self.last else self.transport.receive(p2p.GRADIENT, m)
                input_gradient = self.backward(m, gradient)
                if not self.first:
                    self.transport.send(input_gradient, p2p.GRADIENT, m, self.previous)
        self.transport.finish()
        if self.plan.dp > 1 and self.has_parameters:
            self.allreduce_gradients()
        if self.has_parameters:
            self.step()
        return meter.sums  # zeros except on last stages

    # --- evaluation, forward only through the pipeline ---------------------------

    def evaluate(self, x, y, batch_size=512):
        meter = metrics.Meter()
        for indices in data.batched(data.eval_shard(len(y), self.plan.dp, self.replica), batch_size):
            if self.first:
                inputs = x[indices]
            else:
                inputs = np.empty((len(indices), *self.in_shape), dtype=np.float32)
                self.comm.Recv(inputs, source=self.previous, tag=EVAL_TAG)
            output = self.predict(inputs)
            if self.last:
                meter.add(*softmax_cross_entropy_sums(output, y[indices]), len(indices))
            else:
                self.comm.Send(np.ascontiguousarray(output, dtype=np.float32), dest=self.next, tag=EVAL_TAG)
        return meter.sums

    def allreduce_sums(self, sums, name):
        from mpi4py import MPI

        total = np.zeros_like(sums)
        self.comm.Allreduce(np.ascontiguousarray(sums), total, op=MPI.SUM)
        return total

    def broadcast_object(self, value, name):
        return self.comm.bcast(value, root=self.primary_rank)

    def flag_sum(self, value):
        return self.start_flag_sum(value)()

    def start_flag_sum(self, value):
        """Start a non-blocking MPI sum of ``value`` over the ranks; the returned
        function waits for it and returns the sum."""
        from mpi4py import MPI

        buffers = np.array([int(value)], dtype=np.int64), np.zeros(1, dtype=np.int64)
        request = self.comm.Iallreduce(buffers[0], buffers[1], op=MPI.SUM)

        def answer():
            request.Wait()  # both buffers must live until here: MPI reads/writes them meanwhile
            return int(buffers[1][0])
        return answer

    # --- whole-model state: checkpoints are the same files as in data mode ------

    def gather_state(self):
        """Every stage of replica 0 hands its weights and optimizer state to the primary."""
        part = None
        if self.replica == 0:
            own = self.stage_state()
            part = {name: weights.shift_keys(arrays, self.start) for name, arrays in own.items()}
        parts = self.comm.gather(part, root=self.primary_rank)
        if not self.primary:
            return None
        state = {"weights": {}, "optimizer": {}}
        for piece in filter(None, parts):
            for name in state:
                state[name].update(piece[name])
        return state

    def save_checkpoint(self, path, position, architecture, state):
        self.save_whole(path, position, architecture, state)

    def load_checkpoint(self, path, architecture):
        return self.load_whole(path, architecture)

    def load_weights(self, path, architecture):
        return {"weights": self.read_weights(path, architecture), "optimizer": {}}

    def install_state(self, state):
        """Each rank takes its stage's slice of the primary's whole-model state."""
        state = self.comm.bcast(state, root=self.primary_rank)
        if state is None:
            return  # every rank already holds the seed's initial weights
        self.load_stage_state({name: weights.stage_arrays(arrays, self.start, self.end)
                               for name, arrays in state.items()})
