"""The PyTorch stage: one pipeline stage's arithmetic (model/hybrid), or the whole
model's (ps), with torch autograd. The runners in common/ (pipeline.py,
parameter_server.py) hold one and drive it; see common/core/runner.py's Stage.
"""

import time
from typing import cast

import torch
import torch.nn.functional as F
from torch.nn.utils import parameters_to_vector

from common.core import metrics
from common.core.metrics import IGNORED_LABEL
from common.core.runner import StagePlace
from common.model import networks
from common.model.checkpoint import NeutralState
from common.observe.memory import resident_bytes
from train_torch.checkpoint import load_neutral_state, neutral_state
from train_torch.device import memory_meter, pick_device, to_numpy
from train_torch.horovod_glue import average_batch_norm_statistics
from train_torch.input import TorchFeed, make_feed
from train_torch.model import build_model, build_stage, dropout_keys, set_batch_norm_reduction
from train_torch.optimizer import make_local_optimizer
from train_torch.precision import autocast
from train_torch.wire import StagedWire, make_wire

STEP_REPEATS, STEP_SECONDS = 5, 0.3  # the --mode auto profile times whole-model steps: at least so many, so long
MEMORY_STEPS = 3  # and the steps its memory is measured over


class TorchStage:
    framework = "torch"
    recomputes_forward = False  # autograd keeps the forward's graph for the backward

    @staticmethod
    def keeping_is_faster(specs, input_shape, end, config):
        return False  # nothing to choose: autograd keeps it

    @staticmethod
    def set_threads(threads, local_rank):
        torch.set_num_threads(threads)

    @staticmethod
    def memory_meter(local_rank):
        return memory_meter(pick_device(local_rank))

    @staticmethod
    def measure_layer_times(specs, input_shape, batch_size, repeats=3):
        """(forward, backward) seconds of each layer on a random batch (--balance time), the
        best of ``repeats`` each."""
        model = build_model(specs, input_shape, seed=0)
        x = torch.randn(batch_size, *input_shape)
        times = []
        for layer in model:
            forward = backward = float("inf")
            for _ in range(repeats):
                inputs = x.detach().requires_grad_()
                start = time.perf_counter()
                out = layer(inputs)
                middle = time.perf_counter()
                out.sum().backward()
                forward, backward = min(forward, middle - start), min(backward, time.perf_counter() - middle)
            times.append((forward, backward))
            x = out.detach()
        return times

    @staticmethod
    def measure_step_seconds(specs, input_shape, batch_size, recompute=False, repeats=STEP_REPEATS):
        model = build_model(specs, input_shape, seed=0)
        model.recompute = recompute
        x, keys = torch.randn(batch_size, *input_shape), torch.arange(batch_size)
        return metrics.median_call_seconds(lambda: model(x, keys).sum().backward(), repeats, STEP_SECONDS)

    @staticmethod
    def measure_step_memory(specs, input_shape, batch_size):
        """How many bytes the process grew by over a few whole-model training steps (SGD with
        momentum) of a random batch: the most of its resident memory after a forward, a
        backward and an update, against before the model was built (a run's later steps
        reuse what the first left free, but not all of it)."""
        before = resident_bytes()
        model = build_model(specs, input_shape, seed=0)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        held = []
        for _ in range(MEMORY_STEPS):
            optimizer.zero_grad()
            out = model(torch.randn(batch_size, *input_shape), torch.arange(batch_size))
            held.append(resident_bytes())
            torch.nn.functional.cross_entropy(out, torch.zeros(batch_size, dtype=torch.long)).backward()
            held.append(resident_bytes())
            optimizer.step()
            held.append(resident_bytes())
        return max(held) - before

    @staticmethod
    def make_feed(config, local_rank, dataset, reads):
        return make_feed(config, pick_device(local_rank), dataset, reads)

    @staticmethod
    def make_wire(config, local_rank):
        return make_wire(config.p2p_memory, pick_device(local_rank))

    def __init__(self, place: StagePlace):
        self.first, self.last = place.first, place.last
        self.config, self.feed = place.config, place.feed
        self.stage_set = None  # hybrid: this stage's replicas (use_replica_group)
        self.device = pick_device(place.local_rank)  # each stage on its rank's local GPU
        self.host = StagedWire(self.device) if self.device.type == "cuda" else None  # --mode ps vectors
        self.model = build_stage(place.specs, place.input_shape, place.config.seed, place.start,
                                 place.end).to(self.device, memory_format=cast(TorchFeed, self.feed).memory_format)
        self.model.recompute = place.config.recompute
        self.drops = networks.drops(place.specs[place.start:place.end])  # seeded dropout in this stage
        self.parameters = list(self.model.parameters())
        self.has_parameters = bool(self.parameters)
        self.optimizer = make_local_optimizer(self.model, place.config) if self.parameters else None
        self.stash: dict = {}  # micro-batch -> what its backward needs
        self.deferred: dict = {}  # micro-batch -> what its weight gradients need (--schedule zb)
        self.recording: list | None = None  # a forward's (module output, module parameters), for the split
        # --schedule zb: the convolutions' and dense layers' weight gradients wait; the
        # others (BatchNorm's) come with the input gradient, from the reductions its
        # backward needs anyway. The first stage sends no gradient and runs whole backwards.
        self.early_parameters: list = []
        if place.config.schedule == "zb" and not self.first:
            deferred = [module for module in self.model.modules() if isinstance(module, (torch.nn.Conv2d,
                                                                                        torch.nn.Linear))]
            for module in deferred:
                module.register_forward_hook(self._record)
            waiting = {id(parameter) for module in deferred for parameter in module.parameters()}
            self.early_parameters = [parameter for parameter in self.parameters if id(parameter) not in waiting]

    def _record(self, module, inputs, output):
        if self.recording is not None and output.requires_grad:
            self.recording.append((output, list(module.parameters(recurse=False))))

    @staticmethod
    def join_replica_groups(stage_ranks):
        import horovod.torch as hvd
        from mpi4py import MPI

        # Horovod: one process set per stage (the same list, in the same order, on
        # every rank); each stage's replicas allreduce their gradients inside it.
        sets = [hvd.ProcessSet(ranks) for ranks in stage_ranks]
        hvd.init(comm=MPI.COMM_WORLD, process_sets=sets)
        return sets

    def use_replica_group(self, group, name):
        import horovod.torch as hvd

        self.hvd, self.stage_set, self.stage_name = hvd, group, name
        if self.config.sync_bn:  # Horovod: BatchNorm over the micro-batch of every replica of this stage
            set_batch_norm_reduction(self.model, lambda sums: hvd.allreduce(sums, op=hvd.Sum, process_set=group))

    def share_batch_norm_statistics(self):
        """Hybrid: this stage's replicas average their BatchNorm running statistics."""
        if self.stage_set is not None and not self.config.sync_bn:
            average_batch_norm_statistics(self.hvd, self.model, self.stage_set)

    def zero_grad(self):
        self.model.train()
        if self.optimizer:
            self.optimizer.zero_grad(set_to_none=False)

    def set_lr(self, value):
        for group in (self.optimizer.param_groups if self.optimizer else []):
            group["lr"] = value

    def _inputs(self, inputs, batch):
        if self.first:
            return self.feed.inputs(self.feed.arrive(batch))
        return inputs.to(self.device)

    def forward(self, m, inputs, batch, scale):
        x = self._inputs(inputs, batch)
        if not self.first:
            x.requires_grad_()
        keys = dropout_keys(self.config.seed, batch, self.device) if self.drops else None
        self.recording = []
        with autocast(self.config, self.device):
            out = self.model(x, keys)
        recorded, self.recording = self.recording, None
        if not self.last:
            self.stash[m] = (x, out, recorded)
            return out.float(), (0.0, 0.0)  # float32 on the wire, whatever --amp computes in
        labels = self.feed.labels(self.feed.arrive(batch))
        loss_sum = F.cross_entropy(out.float(), labels, reduction="sum", ignore_index=IGNORED_LABEL)
        # Scaled once: the micro-batches add up to the batch mean.
        self.stash[m] = (x, loss_sum * scale, recorded)
        return None, (loss_sum.item(), (out.argmax(1) == labels).sum().item())

    def _output_gradient(self, out, output_gradient):
        return None if output_gradient is None else output_gradient.to(self.device).to(out.dtype)

    def backward(self, m, output_gradient):
        x, out, _ = self.stash.pop(m)
        out.backward(self._output_gradient(out, output_gradient))
        return None if self.first else x.grad

    def backward_input(self, m, output_gradient):
        """The gradient of the stage's input and of BatchNorm's parameters (autograd skips
        the convolutions' and dense layers' weights), keeping the graph and each such
        layer's output gradient, which its tensor hook catches on the way, for
        backward_weight."""
        x, out, recorded = self.stash.pop(m)
        caught = {}
        hooks = [output.register_hook(lambda gradient, i=i: caught.__setitem__(i, gradient))
                 for i, (output, _) in enumerate(recorded)]
        input_gradient, *early = torch.autograd.grad(out, [x, *self.early_parameters],
                                                     self._output_gradient(out, output_gradient), retain_graph=True)
        for hook in hooks:
            hook.remove()
        self._accumulate(self.early_parameters, early)
        self.deferred[m] = [(output, caught[i], parameters) for i, (output, parameters) in enumerate(recorded)]
        return input_gradient

    @staticmethod
    def _accumulate(parameters, gradients):
        for parameter, gradient in zip(parameters, gradients):
            if parameter.grad is None:
                parameter.grad = gradient
            else:
                parameter.grad.add_(gradient)

    def backward_weight(self, m):
        """Each convolution's and dense layer's weight gradients from its output gradient, one
        layer at a time (together, autograd would also carry a later layer's output gradient
        back to an earlier layer's weights): it walks only the layer's own node, as the input
        path has run, and frees it."""
        for output, output_gradient, parameters in self.deferred.pop(m):
            self._accumulate(parameters, torch.autograd.grad(output, parameters, output_gradient))

    def allreduce_gradients(self):
        gradients = [parameter.grad for parameter in self.parameters]
        # Horovod: sum this stage's gradients over its replicas.
        reduced = self.hvd.grouped_allreduce(gradients, op=self.hvd.Sum, process_set=self.stage_set,
                                             name=self.stage_name)
        for parameter, gradient in zip(self.parameters, reduced):
            parameter.grad.copy_(gradient)

    def step(self):
        self.optimizer.step()

    @torch.no_grad()
    def predict(self, inputs, batch):
        """Evaluation, forward only: the output for the next piece, or on the last piece the
        (loss sum, correct) of the batch (in float64, from float32 logits)."""
        self.model.eval()
        with autocast(self.config, self.device):
            out = self.model(self._inputs(inputs, batch)).float()
        if not self.last:
            return out
        labels = self.feed.labels(self.feed.arrive(batch))
        return metrics.softmax_cross_entropy_sums(to_numpy(out), to_numpy(labels))

    def state(self) -> NeutralState:
        return neutral_state(self.model, self.optimizer)

    def load_state(self, state: NeutralState):
        load_neutral_state(self.model, self.optimizer, state)

    # --- flat vectors for --mode ps ---------------------------------------------------

    def gradient_vector(self):
        return self._to_host("gradient", torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                                                    for p in self.parameters]))

    def set_gradient_vector(self, vector):
        for parameter, piece in self._pieces(vector):
            parameter.grad = piece.clone()

    def parameter_vector(self):
        return self._to_host("parameters", parameters_to_vector(self.parameters).detach())

    @torch.no_grad()
    def set_parameter_vector(self, vector):
        for parameter, piece in self._pieces(vector):
            parameter.copy_(piece)

    def _to_host(self, key, tensor):
        """A flat vector as host memory (through a page-locked buffer from a GPU)."""
        return self.host.send_buffer((key,), tensor) if self.host else to_numpy(tensor)

    def _pieces(self, vector):
        whole = torch.from_numpy(vector).to(self.device)
        offset = 0
        for parameter in self.parameters:
            yield parameter, whole[offset:offset + parameter.numel()].reshape(parameter.shape)
            offset += parameter.numel()
