"""The TensorFlow stage: one pipeline stage's arithmetic (model/hybrid), or the
whole model's (ps). The runners in common/ (pipeline.py, parameter_server.py)
hold one and drive it; see common/core/runner.py's Stage. Each part is a compiled tf.function (run
eagerly, a small CNN's micro-batches spent most of their time in TF's per-op
overhead):
- the last stage computes a micro-batch's loss and all its gradients in one
  call at its forward and keeps them for its backward;
- other stages either run the forward alone, keep the input, and at the backward
  recompute the forward under a tape and ask it for the parameter gradients
  (and, after the first stage, the input's) given the next stage's output
  gradients (``output_gradients``), the recomputation leaving BatchNorm's
  running statistics alone (they moved once, at the forward); or run the
  compiled forward under an eager tape, which makes TF keep the function's
  intermediates for it. The tape costs a fixed time per call and saves the
  recomputed forward: the pipeline times both once (keeping_is_faster) and
  every stage does what was faster (docs/benchmarks.md, "Where a step's time goes");
- with --schedule zb, a stage after the first cuts its backward into the input
  gradient and the convolutions' and dense layers' weight gradients (below).
Activations travel channel-first, as in common/, so a TF stage and a PyTorch
stage exchange the same arrays; the transposes run inside the compiled graphs.
"""

import time

import numpy as np
import tensorflow as tf

from common.core import metrics
from common.core.runner import StagePlace
from common.model import networks
from common.model.checkpoint import NeutralState
from common.observe.memory import resident_bytes
from train_tf.checkpoint import load_neutral_state, neutral_state
from train_tf.device import memory_meter, pin_gpu
from train_tf.horovod_glue import average_batch_norm_statistics
from train_tf.input import loss_sum_and_correct, make_feed
from train_tf.model import (
    build_model,
    build_stage,
    dropout_keys,
    frozen_batch_norm_statistics,
    recording_weight_layers,
    set_batch_norm_reduction,
    to_channels_last,
)
from train_tf.optimizer import Optimizer
from train_tf.precision import set_precision
from train_tf.wire import make_wire


def channels_last(x):
    """NCHW -> NHWC inside a graph (other ranks pass through)."""
    return tf.transpose(x, [0, 2, 3, 1]) if x.shape.rank == 4 else x


def channels_first(x):
    return tf.transpose(x, [0, 3, 1, 2]) if x.shape.rank == 4 else x


STEP_REPEATS, STEP_SECONDS = 5, 0.3  # the --mode auto profile times whole-model steps: at least so many, so long
MEMORY_STEPS = 3  # and the steps its memory is measured over


class TfStage:
    framework = "tf"
    recomputes_forward = True  # a stage before the last runs its forward again at the backward (or keeps it)

    @staticmethod
    def set_threads(threads, local_rank):
        pin_gpu(local_rank)
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)

    @staticmethod
    def memory_meter(local_rank):
        return memory_meter(pin_gpu(local_rank))

    @staticmethod
    def measure_layer_times(specs, input_shape, batch_size, repeats=3):
        """(forward, backward) seconds of each layer on a random batch (--balance time), the
        best of ``repeats`` each."""
        model = build_model(specs, input_shape, seed=0)
        x = tf.constant(to_channels_last(np.random.default_rng(0).standard_normal(
            (batch_size, *input_shape)).astype(np.float32)))
        times = []
        for layer in model.layers_:
            forward = backward = float("inf")
            for _ in range(repeats):
                start = time.perf_counter()
                with tf.GradientTape() as tape:
                    tape.watch(x)
                    out = layer(x, training=True)
                    total = tf.reduce_sum(out)
                middle = time.perf_counter()
                tape.gradient(total, [x] + layer.trainable_variables)
                forward, backward = min(forward, middle - start), min(backward, time.perf_counter() - middle)
            times.append((forward, backward))
            x = out
        return times

    @staticmethod
    def measure_step_seconds(specs, input_shape, batch_size, recompute=False, repeats=STEP_REPEATS):
        model = build_model(specs, input_shape, seed=0)
        model.recompute = recompute
        images = tf.random.stateless_normal((batch_size, *input_shape[1:], input_shape[0]), seed=(0, 0))
        keys = tf.range(batch_size, dtype=tf.int64) if networks.drops(specs) else tf.zeros([0], tf.int64)

        @tf.function
        def forward_and_backward():
            with tf.GradientTape() as tape:
                total = tf.reduce_sum(tf.cast(model(images, training=True, dropout_keys=keys), tf.float32))
            return tape.gradient(total, model.trainable_variables)
        # The first call traces; .numpy() waits for the step, on a GPU too.
        return metrics.median_call_seconds(lambda: forward_and_backward()[0].numpy(), repeats, STEP_SECONDS)

    @staticmethod
    def measure_step_memory(specs, input_shape, batch_size):
        """How many bytes the process grew by over a few whole-model compiled training steps
        (SGD with momentum) of a random batch, against before the model was built: the most
        of its resident memory after each step, whose traced graph is the one a run keeps."""
        before = resident_bytes()
        model = build_model(specs, input_shape, seed=0)
        variables = model.trainable_variables
        velocities = [tf.Variable(tf.zeros_like(variable)) for variable in variables]
        images = tf.random.stateless_normal((batch_size, *input_shape[1:], input_shape[0]), seed=(0, 0))
        keys = tf.range(batch_size, dtype=tf.int64) if networks.drops(specs) else tf.zeros([0], tf.int64)

        @tf.function
        def step():
            with tf.GradientTape() as tape:
                out = tf.cast(model(images, training=True, dropout_keys=keys), tf.float32)
                loss = tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(
                    tf.zeros([batch_size], tf.int64), out))
            for variable, velocity, gradient in zip(variables, velocities, tape.gradient(loss, variables)):
                velocity.assign(0.9 * velocity + gradient)
                variable.assign_sub(0.01 * velocity)
        held = []
        for _ in range(MEMORY_STEPS):
            step()
            held.append(resident_bytes())
        return max(held) - before

    @staticmethod
    def make_feed(config, local_rank, dataset, reads):
        return make_feed(config, pin_gpu(local_rank), dataset)

    @staticmethod
    def make_wire(config, local_rank):
        return make_wire(config.p2p_memory)

    def __init__(self, place: StagePlace):
        self.first, self.last = place.first, place.last
        self.config, self.feed = place.config, place.feed
        self.stage_set = None  # hybrid: this stage's replicas (use_replica_group)
        self.specs, self.input_shape, self.end = place.specs, place.input_shape, place.end
        self.in_shape = networks.layer_shapes(place.specs, place.input_shape)[place.start]
        set_precision(place.config)
        self.model = build_stage(place.specs, place.input_shape, place.config.seed, place.start, place.end)
        self.model.recompute = place.config.recompute
        self.variables = self.model.trainable_variables
        self.has_parameters = bool(self.variables)
        self.optimizer = Optimizer(self.variables, place.config)
        self._apply = tf.function(lambda gradients: self.optimizer.apply(gradients, self.variables))
        # Compiled, channel-first in and out (the wire's layout, transposed inside the
        # graph), float32 on the wire and into the loss, whatever --amp computes in.
        self.drops = networks.drops(place.specs[place.start:place.end])  # seeded dropout in this stage
        self._forward = tf.function(lambda x, keys: channels_first(tf.cast(
            self.model(channels_last(x), training=True, dropout_keys=keys), tf.float32)), reduce_retracing=True)
        self._recompute_backward = tf.function(self._gradients_given_output_gradients, reduce_retracing=True)
        self._loss_backward = tf.function(self._loss_and_gradients, reduce_retracing=True)
        self.stash: dict = {}  # micro-batch -> what its backward needs
        self.gradients: list = []
        self.split = place.config.schedule == "zb" and not self.first  # the first runs whole backwards
        if self.split:
            self._init_split_backward()
        self._add = tf.function(lambda totals, gradients: [t + g for t, g in zip(totals, gradients)],
                                reduce_retracing=True)
        # A stage before the last recomputes its forward at the backward, or keeps the
        # forward's intermediates on an eager tape where the pipeline found that faster.
        self.keeps_forward = place.keep_forward and not (self.last or self.split)

    @staticmethod
    def keeping_is_faster(specs, input_shape, end, config):
        """Whether a micro-batch of layers 0..end-1 runs faster keeping its forward than
        recomputing it, timed on a throwaway stage: the eager tape around the compiled
        forward saves the recomputed forward but adds a fixed cost per call, so large
        layers (ResNet-18's) keep and a few small ones (the seed CNN's) recompute
        (benchmarks/tf_recompute.py)."""
        trial = TfStage(StagePlace(tuple(specs), input_shape, 0, end, True, False, config, 0, None))
        count = max(1, config.batch_size // config.microbatches)
        return trial.microbatch_seconds(True, count, repeats=2) < trial.microbatch_seconds(False, count, repeats=2)

    def microbatch_seconds(self, keep: bool, count: int, repeats: int, pick=min) -> float:
        """One random micro-batch's forward and backward through this stage's own code,
        keeping the forward on a tape or recomputing it: ``pick`` of ``repeats`` timings
        after one that traces."""
        out_shape = networks.layer_shapes(self.specs, self.input_shape)[self.end]
        x = tf.random.stateless_normal((count, *self.in_shape), seed=(0, 0))
        upstream = tf.random.stateless_normal((count, *out_shape), seed=(0, 1))
        keys = tf.zeros([count] if self.drops else [0], tf.int64)
        self.zero_grad()
        self.keeps_forward = keep
        times = []
        for _ in range(repeats + 1):
            start = time.perf_counter()
            if keep:
                self.stash[-1] = self._forward_kept(x, keys)
            else:
                self._forward(x, keys)
                self.stash[-1] = (x, keys)
            self.backward(-1, upstream)
            times.append(time.perf_counter() - start)
        return pick(times[1:])

    def _forward_kept(self, x, keys):
        tape = tf.GradientTape()
        with tape:
            tape.watch(x)
            out = self._forward(x, keys)
        return tape, x, out

    # --- --schedule zb: a backward cut into input and weight gradients -------------------
    # The input-gradient part asks the tape for the input's gradient, BatchNorm's, and each
    # convolution's and dense layer's output gradient (no weight-gradient op is built);
    # the weight-gradient part runs each such layer under a tape of its own from its input
    # and output gradient: only the weight-gradient ops remain, the layer's forward has no
    # use and the graph leaves it out.

    def _init_split_backward(self) -> None:
        self.recorded_layers: list = []  # the weight layers, in the order a trace of the forward runs them
        self.deferred: dict = {}  # micro-batch -> (inputs, output gradients) of the weight layers
        self._input_backward = tf.function(self._input_gradients, reduce_retracing=True)
        self._loss_input_backward = tf.function(self._loss_and_input_gradients, reduce_retracing=True)
        self._weight_backward = tf.function(self._weight_gradients, reduce_retracing=True)

    def _split_gradients(self, tape, target, x, records, upstream, accumulated):
        """The input's gradient, every gradient but the recorded layers' (added to
        ``accumulated``), and the recorded layers' inputs and output gradients: the
        recording alone says which variables wait for the weight part."""
        self.recorded_layers = [layer for layer, _, _ in records]
        deferred = {id(variable) for layer in self.recorded_layers for variable in layer.trainable_variables}
        others = [i for i, variable in enumerate(self.variables) if id(variable) not in deferred]
        sources = [x, *(output for _, _, output in records), *(self.variables[i] for i in others)]
        gradients = tape.gradient(target, sources, output_gradients=upstream,
                                  unconnected_gradients=tf.UnconnectedGradients.ZERO)
        outputs_end = 1 + len(records)
        totals = list(accumulated)
        for i, gradient in zip(others, gradients[outputs_end:]):
            totals[i] = totals[i] + gradient
        return gradients[0], totals, [layer_input for _, layer_input, _ in records], gradients[1:outputs_end]

    def _input_gradients(self, x, keys, upstream, accumulated):
        with tf.GradientTape() as tape:
            tape.watch(x)
            with frozen_batch_norm_statistics(), recording_weight_layers() as records:  # they moved at the forward
                out = channels_first(self.model(channels_last(x), training=True, dropout_keys=keys))
        return self._split_gradients(tape, out, x, records, tf.cast(upstream, out.dtype), accumulated)

    def _loss_and_input_gradients(self, x, keys, labels, scale, accumulated):
        with tf.GradientTape() as tape:
            tape.watch(x)
            with recording_weight_layers() as records:
                out = tf.cast(self.model(channels_last(x), training=True, dropout_keys=keys), tf.float32)
            loss_sum, correct = loss_sum_and_correct(labels, out)
            target = loss_sum * scale
        return (loss_sum, correct, *self._split_gradients(tape, target, x, records, None, accumulated))

    def _weight_gradients(self, inputs, output_gradients, accumulated):
        totals = list(accumulated)
        position = {id(variable): i for i, variable in enumerate(self.variables)}
        for layer, layer_input, output_gradient in zip(self.recorded_layers, inputs, output_gradients):
            with tf.GradientTape() as tape:
                output = layer(layer_input)
            variables = layer.trainable_variables
            gradients = tape.gradient(output, variables, output_gradients=output_gradient)
            for variable, gradient in zip(variables, gradients):
                totals[position[id(variable)]] = totals[position[id(variable)]] + gradient
        return totals

    def _gradients_given_output_gradients(self, x, keys, upstream, accumulated):
        with tf.GradientTape() as tape:
            tape.watch(x)
            with frozen_batch_norm_statistics():  # they moved at the forward
                # The same keys draw the forward's dropout masks again.
                out = channels_first(self.model(channels_last(x), training=True, dropout_keys=keys))
        sources = list(self.variables) if self.first else [x, *self.variables]  # no input gradient to send
        gradients = tape.gradient(out, sources, output_gradients=tf.cast(upstream, out.dtype),
                                  unconnected_gradients=tf.UnconnectedGradients.ZERO)
        input_gradient = tf.zeros(()) if self.first else gradients.pop(0)
        return input_gradient, [total + gradient for total, gradient in zip(accumulated, gradients)]

    def _loss_and_gradients(self, x, keys, labels, scale, accumulated):
        with tf.GradientTape() as tape:
            tape.watch(x)
            out = tf.cast(self.model(channels_last(x), training=True, dropout_keys=keys), tf.float32)
            loss_sum, correct = loss_sum_and_correct(labels, out)
            target = loss_sum * scale  # scaled once: the micro-batches add up to the batch mean
        gradients = tape.gradient(target, [x] + list(self.variables),
                                  unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return (loss_sum, correct, gradients[0],
                [total + gradient for total, gradient in zip(accumulated, gradients[1:])])

    @staticmethod
    def join_replica_groups(stage_ranks):
        import horovod.tensorflow as hvd
        from mpi4py import MPI

        # Horovod: one process set per stage (the same list, in the same order, on
        # every rank); each stage's replicas allreduce their gradients inside it.
        sets = [hvd.ProcessSet(ranks) for ranks in stage_ranks]
        hvd.init(comm=MPI.COMM_WORLD, process_sets=sets)
        return sets

    def use_replica_group(self, group, name):
        import horovod.tensorflow as hvd

        # (Horovod's TF grouped_allreduce takes no name: it names its ops itself.)
        self.hvd, self.stage_set = hvd, group
        if self.config.sync_bn:  # Horovod: BatchNorm over the micro-batch of every replica of this stage
            set_batch_norm_reduction(self.model, lambda sums: hvd.allreduce(sums, op=hvd.Sum, process_set=group))

    def share_batch_norm_statistics(self):
        """Hybrid: this stage's replicas average their BatchNorm running statistics."""
        if self.stage_set is not None and not self.config.sync_bn:
            average_batch_norm_statistics(self.hvd, self.model, self.stage_set)

    def zero_grad(self):
        self.gradients = [tf.zeros_like(variable) for variable in self.variables]

    def set_lr(self, value):
        self.optimizer.lr.assign(value)

    def _inputs(self, inputs, batch):
        """Channel-first float32: the wire's layout (the first piece makes it of the batch)."""
        if self.first:
            return self.feed.inputs_channels_first(self.feed.arrive(batch))
        return tf.convert_to_tensor(inputs)

    def forward(self, m, inputs, batch, scale):
        x = self._inputs(inputs, batch)
        keys = dropout_keys(self.config.seed, batch, self.drops)
        if self.keeps_forward:
            self.stash[m] = self._forward_kept(x, keys)
            return self.stash[m][2], (0.0, 0.0)
        if not self.last:
            self.stash[m] = (x, keys)
            return self._forward(x, keys), (0.0, 0.0)
        labels, scale = self.feed.labels(batch), tf.constant(scale, tf.float32)
        if self.split:
            loss_sum, correct, input_gradient, self.gradients, *self.deferred[m] = self._loss_input_backward(
                x, keys, labels, scale, self.gradients)
        else:
            loss_sum, correct, input_gradient, self.gradients = self._loss_backward(
                x, keys, labels, scale, self.gradients)
        self.stash[m] = input_gradient
        return None, (float(loss_sum), float(correct))

    def backward(self, m, output_gradient):
        if self.last:
            input_gradient = self.stash.pop(m)  # computed with the loss, at the forward
        elif self.keeps_forward:
            tape, x, out = self.stash.pop(m)
            sources = list(self.variables) if self.first else [x, *self.variables]  # no input gradient to send
            gradients = tape.gradient(out, sources, output_gradients=tf.cast(output_gradient, out.dtype),
                                      unconnected_gradients=tf.UnconnectedGradients.ZERO)
            input_gradient = None if self.first else gradients.pop(0)
            self.gradients = self._add(self.gradients, gradients)
        else:
            x, keys = self.stash.pop(m)
            input_gradient, self.gradients = self._recompute_backward(
                x, keys, tf.convert_to_tensor(output_gradient), self.gradients)
        return None if self.first else input_gradient

    def backward_input(self, m, output_gradient):
        if self.last:
            return self.stash.pop(m)  # computed with the loss, at the forward
        x, keys = self.stash.pop(m)
        input_gradient, self.gradients, *self.deferred[m] = self._input_backward(
            x, keys, tf.convert_to_tensor(output_gradient), self.gradients)
        return input_gradient

    def backward_weight(self, m):
        inputs, output_gradients = self.deferred.pop(m)
        self.gradients = self._weight_backward(inputs, output_gradients, self.gradients)

    def allreduce_gradients(self):
        # Horovod: sum this stage's gradients over its replicas.
        self.gradients = self.hvd.grouped_allreduce(self.gradients, op=self.hvd.Sum,
                                                    process_set=self.stage_set)

    def step(self):
        self._apply(self.gradients)

    def predict(self, inputs, batch):
        """Evaluation, forward only: the output for the next piece (channel-first), or on the
        last piece the batch's (loss sum, correct) (in float64, from float32 logits)."""
        out = tf.cast(self.model(channels_last(self._inputs(inputs, batch)), training=False), tf.float32)
        if not self.last:
            return channels_first(out)
        return metrics.softmax_cross_entropy_sums(out.numpy(), np.asarray(self.feed.labels(batch)))

    def state(self) -> NeutralState:
        return neutral_state(self.model, self.in_shape, self.optimizer)

    def load_state(self, state: NeutralState):
        load_neutral_state(self.model, self.in_shape, self.optimizer, state)

    # --- flat vectors for --mode ps ---------------------------------------------------

    def gradient_vector(self):
        return np.concatenate([np.asarray(gradient).reshape(-1) for gradient in self.gradients])

    def set_gradient_vector(self, vector):
        self.gradients = [tf.constant(piece) for piece in self._pieces(vector)]

    def parameter_vector(self):
        return np.concatenate([variable.numpy().reshape(-1) for variable in self.variables])

    def set_parameter_vector(self, vector):
        for variable, piece in zip(self.variables, self._pieces(vector)):
            variable.assign(piece)

    def _pieces(self, vector):
        offset = 0
        for variable in self.variables:
            size = int(np.prod(variable.shape))
            yield vector[offset:offset + size].reshape(tuple(variable.shape))
            offset += size
