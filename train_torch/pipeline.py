"""The PyTorch stage of a pipeline (model-parallel and hybrid modes).

common/pipeline.py runs the schedule, the transport and the state exchange;
this class does one stage's arithmetic with torch autograd.
"""

import time

import torch
import torch.nn.functional as F

from common.pipeline import PipelineRunner
from train_torch import checkpoint
from train_torch.device import pick_device, to_device, to_numpy
from train_torch.model import build_model, build_stage, load_neutral, to_neutral
from train_torch.optimizer import load_optimizer_neutral, make_local_optimizer, optimizer_to_neutral


def measure_layer_times(specs, input_shape, batch_size, repeats=3):
    """Seconds for forward + backward of each layer on a random batch (--balance time)."""
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


class TorchPipelineRunner(PipelineRunner):
    framework = "pytorch"
    checkpoint_extension = checkpoint.EXTENSION

    def set_threads(self, threads):
        torch.set_num_threads(threads)

    def measure_layer_times(self, batch_size):
        return measure_layer_times(self.specs, self.dataset.image_shape, batch_size)

    def build_stage(self, start, end):
        self.device = pick_device(self.local_rank)
        self.model = build_stage(self.specs, self.dataset.image_shape, self.config.seed, start, end).to(self.device)
        self.parameters = list(self.model.parameters())
        self.has_parameters = bool(self.parameters)
        self.optimizer = make_local_optimizer(self.model, self.config) if self.parameters else None
        self.stash = {}

    def init_stage_allreduce(self, stage_ranks):
        import horovod.torch as hvd
        from mpi4py import MPI

        # Horovod: one process set per stage (the same list, in the same order, on
        # every rank); each stage's replicas allreduce their gradients inside it.
        sets = [hvd.ProcessSet(ranks) for ranks in stage_ranks]
        hvd.init(comm=MPI.COMM_WORLD, process_sets=sets)
        self.hvd, self.stage_set = hvd, sets[self.stage]

    def zero_grad(self):
        self.model.train()
        if self.optimizer:
            self.optimizer.zero_grad(set_to_none=False)

    def set_lr(self, value):
        for group in (self.optimizer.param_groups if self.optimizer else []):
            group["lr"] = value

    def forward(self, m, inputs, labels, scale):
        x = to_device(inputs, self.device)
        if not self.first:
            x.requires_grad_()
        out = self.model(x)
        if not self.last:
            self.stash[m] = (x, out)
            return to_numpy(out), (0.0, 0.0)
        labels = to_device(labels, self.device)
        loss_sum = F.cross_entropy(out, labels, reduction="sum")
        self.stash[m] = (x, loss_sum * scale)  # scaled once: the micro-batches add up to the batch mean
        return None, (loss_sum.item(), (out.argmax(1) == labels).sum().item())

    def backward(self, m, output_gradient):
        x, out = self.stash.pop(m)
        if output_gradient is None:
            out.backward()
        else:
            out.backward(to_device(output_gradient, self.device))
        return None if self.first else to_numpy(x.grad)

    def allreduce_gradients(self):
        gradients = [parameter.grad for parameter in self.parameters]
        # Horovod: sum this stage's gradients over its replicas.
        reduced = self.hvd.grouped_allreduce(gradients, op=self.hvd.Sum, process_set=self.stage_set,
                                             name=f"stage{self.stage}_gradients")
        for parameter, gradient in zip(self.parameters, reduced):
            parameter.grad.copy_(gradient)

    def step(self):
        self.optimizer.step()

    @torch.no_grad()
    def predict(self, inputs):
        self.model.eval()
        return to_numpy(self.model(to_device(inputs, self.device)))

    def stage_state(self):
        return {"weights": to_neutral(self.model),
                "optimizer": optimizer_to_neutral(self.model, self.optimizer) if self.optimizer else {}}

    def load_stage_state(self, state):
        load_neutral(self.model, state["weights"])
        if state["optimizer"] and self.optimizer:
            load_optimizer_neutral(self.model, self.optimizer, state["optimizer"])

    def _whole_model(self, state=None):
        model = build_model(self.specs, self.dataset.image_shape, self.config.seed)
        optimizer = make_local_optimizer(model, self.config)
        if state is not None:
            load_neutral(model, state["weights"])
            load_optimizer_neutral(model, optimizer, state["optimizer"])
        return model, optimizer

    def save_whole(self, path, position, architecture, state):
        model, optimizer = self._whole_model(state)
        checkpoint.write(path, position, model, optimizer, self.config, architecture)

    def load_whole(self, path, architecture):
        saved = checkpoint.load(path, architecture)
        model, optimizer = self._whole_model()
        checkpoint.restore(saved, model, optimizer)
        return checkpoint.position(saved), {"weights": to_neutral(model),
                                            "optimizer": optimizer_to_neutral(model, optimizer)}

    def read_weights(self, path, architecture):
        return checkpoint.read_weights(path, architecture)
