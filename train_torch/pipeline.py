"""Model-parallel and hybrid training: the CNN split into pipeline stages
(the runner for common/training.py).

Each rank runs one stage (a slice of the layer specs) for its replica. The
schedule (common/schedule.py) says when to run each micro-batch's forward and
backward; activations go forward and their gradients backward with the
buffer-based MPI transport (common/p2p.py). The loss lives on the last stage
and is the summed per-sample loss divided by the global batch size, so the
gradients over all micro-batches (and, in hybrid mode, summed over the
replicas of each stage with Horovod process sets) are exactly the full-batch
mean gradient. Micro-batches are np.array_split of the replica's share, the
same cut data mode's --accumulation-steps makes, which fixes the BatchNorm
semantics: each micro-batch is normalised by its own statistics and the
running statistics are updated once per micro-batch.
"""

import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from common import data, metrics, models, p2p, plan, schedule, weights
from train_torch import checkpoint
from train_torch.model import build_model, build_stage, load_neutral, to_neutral
from train_torch.optimizer import load_optimizer_neutral, make_local_optimizer, optimizer_to_neutral

EVAL_TAG = 1 << 20  # above every training tag (2 * micro-batch + kind)


def measure_layer_times(specs, input_shape, batch_size, repeats=3):
    """Seconds for forward + backward of each layer on a synthetic batch (--balance time)."""
    model = build_model(specs, input_shape, seed=0)
    x = torch.randn(batch_size, *input_shape)
    times = []
    for layer in model:
        best = float("inf")
        for _ in range(repeats):
            inputs = x.detach().requires_grad_()
            start = time.perf_counter()
            out = layer(inputs)
            out.sum().backward()
            best = min(best, time.perf_counter() - start)
        times.append(best)
        x = out.detach()
    return times


def layer_costs(config, specs, input_shape, comm, primary_rank):
    if config.balance == "time":
        # Measured once on one rank and shared: every rank must cut the same stages.
        times = None
        if comm.rank == primary_rank:
            times = measure_layer_times(specs, input_shape, max(1, config.batch_size // config.microbatches))
        return comm.bcast(times, root=primary_rank)
    column = {"flops": 3, "params": 2}[config.balance]
    return [cost[column] for cost in models.layer_costs(specs, input_shape)]


class PipelineRunner:
    framework = "pytorch"
    checkpoint_extension = checkpoint.EXTENSION

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

        local_ranks = self.comm.Split_type(MPI.COMM_TYPE_SHARED).size
        self.threads = config.threads or max(1, (os.cpu_count() or 1) // local_ranks)
        torch.set_num_threads(self.threads)

        costs = layer_costs(config, specs, dataset.image_shape, self.comm, self.primary_rank)
        self.ranges = plan.partition(costs, self.plan.pp, config.split)
        self.start, self.end = self.ranges[self.stage]
        shapes = models.layer_shapes(specs, dataset.image_shape)
        self.in_shape, self.out_shape = shapes[self.start], shapes[self.end]
        self.layout = [f"stage {s}: layers {a}-{b - 1} ({', '.join(type(x).__name__ for x in specs[a:b])}), "
                       f"cost {sum(costs[a:b]):.3g} ({config.balance}), ranks {self.plan.stage_ranks(s)}"
                       for s, (a, b) in enumerate(self.ranges)]

        self.model = build_stage(specs, dataset.image_shape, config.seed, self.start, self.end)
        self.parameters = list(self.model.parameters())
        self.optimizer = make_local_optimizer(self.model, config) if self.parameters else None
        self.transport = p2p.Transport(self.comm)
        self.hvd, self.stage_set = self._init_stage_allreduce()

    def _init_stage_allreduce(self):
        if self.plan.dp == 1:
            return None, None
        import horovod.torch as hvd
        from mpi4py import MPI

        # Horovod: one process set per stage (the same list, in the same order, on
        # every rank); each stage's replicas allreduce their gradients inside it.
        sets = [hvd.ProcessSet(self.plan.stage_ranks(s)) for s in range(self.plan.pp)]
        hvd.init(comm=MPI.COMM_WORLD, process_sets=sets)
        return hvd, sets[self.stage]

    # --- one optimizer step -----------------------------------------------------

    def set_lr(self, value):
        for group in (self.optimizer.param_groups if self.optimizer else []):
            group["lr"] = value

    def train_step(self, indices, global_count):
        self.model.train()
        if self.optimizer:
            self.optimizer.zero_grad(set_to_none=False)
        microbatches = [chunk for chunk in np.array_split(indices, self.config.microbatches) if len(chunk)]
        self._post_receives(microbatches)
        meter, inputs, outputs = metrics.Meter(), {}, {}
        for action in schedule.compute_actions(self.config.schedule, self.stage, self.plan.pp,
                                               len(microbatches)):
            m = action.microbatch
            if action.kind == schedule.FORWARD:
                inputs[m], outputs[m] = self._forward(m, microbatches[m], global_count, meter)
            else:
                self._backward(m, inputs.pop(m), outputs.pop(m))
        self.transport.finish()
        self._allreduce_gradients()
        if self.optimizer:
            self.optimizer.step()
        return meter.sums

    def _post_receives(self, microbatches):
        for m, chunk in enumerate(microbatches):
            if not self.first:
                self.transport.post_receive(p2p.ACTIVATION, m, self.previous, (len(chunk), *self.in_shape))
            if not self.last:
                self.transport.post_receive(p2p.GRADIENT, m, self.next, (len(chunk), *self.out_shape))

    def _forward(self, m, chunk, global_count, meter):
        if self.first:
            x = torch.from_numpy(self.dataset.x_train[chunk])
        else:
            x = torch.from_numpy(self.transport.receive(p2p.ACTIVATION, m)).requires_grad_()
        out = self.model(x)
        if not self.last:
            self.transport.send(out.detach().numpy(), p2p.ACTIVATION, m, self.next)
            return x, out
        labels = torch.from_numpy(self.dataset.y_train[chunk])
        loss_sum = F.cross_entropy(out, labels, reduction="sum")
        meter.add(loss_sum.item(), (out.argmax(1) == labels).sum().item(), len(chunk))
        return x, loss_sum / global_count  # scaled once: the micro-batches' sum is the batch mean

    def _backward(self, m, x, out):
        if self.last:
            out.backward()
        else:
            out.backward(torch.from_numpy(self.transport.receive(p2p.GRADIENT, m)))
        if not self.first:
            self.transport.send(x.grad.numpy(), p2p.GRADIENT, m, self.previous)

    def _allreduce_gradients(self):
        if self.hvd is None or not self.parameters:
            return
        gradients = [parameter.grad for parameter in self.parameters]
        # Horovod: sum this stage's gradients over its replicas.
        reduced = self.hvd.grouped_allreduce(gradients, op=self.hvd.Sum, process_set=self.stage_set,
                                             name=f"stage{self.stage}_gradients")
        for parameter, gradient in zip(self.parameters, reduced):
            parameter.grad.copy_(gradient)

    # --- evaluation, forward only through the pipeline ---------------------------

    @torch.no_grad()
    def evaluate(self, x, y, batch_size=512):
        self.model.eval()
        meter = metrics.Meter()
        for indices in data.batched(data.eval_shard(len(y), self.plan.dp, self.replica), batch_size):
            if self.first:
                inputs = torch.from_numpy(x[indices])
            else:
                buffer = np.empty((len(indices), *self.in_shape), dtype=np.float32)
                self.comm.Recv(buffer, source=self.previous, tag=EVAL_TAG)
                inputs = torch.from_numpy(buffer)
            out = self.model(inputs)
            if self.last:
                labels = torch.from_numpy(y[indices])
                meter.add(F.cross_entropy(out, labels, reduction="sum").item(),
                          (out.argmax(1) == labels).sum().item(), len(indices))
            else:
                self.comm.Send(np.ascontiguousarray(out.numpy()), dest=self.next, tag=EVAL_TAG)
        return meter.sums  # zeros except on last stages

    def allreduce_sums(self, sums, name):
        from mpi4py import MPI

        total = np.zeros_like(sums)
        self.comm.Allreduce(np.ascontiguousarray(sums), total, op=MPI.SUM)
        return total

    def broadcast_object(self, value, name):
        return self.comm.bcast(value, root=self.primary_rank)

    # --- whole-model state: checkpoints are the same files as in data mode ------

    def _whole_model(self, state=None):
        shape = self.dataset.image_shape
        model = build_model(self.specs, shape, self.config.seed)
        optimizer = make_local_optimizer(model, self.config)
        if state is not None:
            load_neutral(model, state["weights"])
            load_optimizer_neutral(model, optimizer, state["optimizer"] or {})
        return model, optimizer

    def gather_state(self):
        """Every stage of replica 0 hands its weights and optimizer state to the primary."""
        part = None
        if self.replica == 0:
            part = {"weights": weights.shift_keys(to_neutral(self.model), self.start),
                    "optimizer": weights.shift_keys(optimizer_to_neutral(self.model, self.optimizer), self.start)
                    if self.optimizer else {}}
        parts = self.comm.gather(part, root=self.primary_rank)
        if not self.primary:
            return None
        state = {"weights": {}, "optimizer": {}}
        for piece in filter(None, parts):
            state["weights"].update(piece["weights"])
            state["optimizer"].update(piece["optimizer"])
        return state

    def save_checkpoint(self, path, epoch, architecture, state):
        model, optimizer = self._whole_model(state)
        checkpoint.write(path, epoch, model, optimizer, self.config, architecture)

    def load_checkpoint(self, path, architecture):
        saved = checkpoint.load(path, architecture)
        model, optimizer = self._whole_model()
        checkpoint.restore(saved, model, optimizer)
        return saved["epoch"], {"weights": to_neutral(model), "optimizer": optimizer_to_neutral(model, optimizer)}

    def load_weights(self, path, architecture):
        return {"weights": checkpoint.read_weights(path, architecture), "optimizer": None}

    def install_state(self, state):
        """Each rank takes its stage's slice of the primary's whole-model state."""
        state = self.comm.bcast(state, root=self.primary_rank)
        if state is None:
            return  # every rank already holds the seed's initial weights
        load_neutral(self.model, weights.stage_arrays(state["weights"], self.start, self.end))
        if state["optimizer"] and self.optimizer:
            load_optimizer_neutral(self.model, self.optimizer,
                                   weights.stage_arrays(state["optimizer"], self.start, self.end))
