"""Data-parallel training with Horovod ring-allreduce (a common/core/runner.py Runner).

Lines that differ from single-process training are marked "# Horovod:".
As in train_torch: each rank divides its summed loss by the global batch size
and the gradients are SUMMED across ranks, so the update is exactly the
full-batch mean gradient. The allreduces are ops of the compiled step: the
gradients, in buckets of about 4 MB taken in the order the backward produces
them (last layer first), are each allreduced by a Horovod op as soon as the
backward has produced them, and TF's executor runs the rest of the backward
meanwhile (Horovod's ops are asynchronous). Gradients of a rank's chunks
(--accumulation-steps) are added up locally first and allreduced once, after
the last chunk, with hvd.grouped_allreduce (as is --adasum's reduction).
"""


import tensorflow as tf

from common.core.config import Amp
from common.model import networks, weights
from common.model.loss_scale import DynamicLossScale
from common.parallel.data_parallel import ReplicaRunner, apply_data_layout, gradient_buckets, run_elastic
from train_tf.checkpoint import load_neutral_state, neutral_state
from train_tf.device import memory_meter
from train_tf.horovod_glue import HorovodCollectives, average_batch_norm_statistics, init_horovod
from train_tf.input import DeviceMeter, loss_sum_and_correct, make_feed
from train_tf.model import build_model, dropout_keys, set_batch_norm_reduction
from train_tf.optimizer import Optimizer
from train_tf.precision import set_precision


def variables_state(hvd, variables, **values):
    """Horovod elastic state over TF variables (and ``values``): a copy kept at each commit,
    restored after a failure, broadcast from rank 0 when workers change. Horovod's own
    TensorFlowState broadcasts its variables only when it is built (in eager mode), so a
    worker joining later would keep its own initial weights."""
    from horovod.common.elastic import ObjectState

    class VariablesState(ObjectState):
        def __init__(self):
            self._save_variables()
            super().__init__(bcast_object=hvd.broadcast_object, get_rank=hvd.rank, **values)

        def _save_variables(self):
            self._saved_values = [tf.identity(variable) for variable in variables]

        def save(self):
            self._save_variables()
            super().save()

        def restore(self):
            for variable, value in zip(variables, self._saved_values):
                variable.assign(value)
            super().restore()

        def sync(self):
            hvd.broadcast_variables(variables, root_rank=0)
            self._save_variables()
            super().sync()

    return VariablesState()


def elastic_run(hvd):
    """Horovod's elastic.run for TF, also recognising a failed grouped allreduce, eager or in
    the compiled step: Horovod's own wrapper matches 'HorovodAllreduce' etc. in the error,
    which neither contains, so a lost worker would end the job instead of rolling it back."""
    from horovod.common.elastic import run_fn
    from horovod.common.exceptions import HorovodInternalError

    def decorate(train):
        def wrapper(state):
            try:
                return train(state)
            except tf.errors.UnknownError as error:
                # An eager op's error names it (HorovodGroupedAllreduce); one of the compiled
                # step's says "Graph execution error" and names Horovod's files (its Gloo).
                if "horovod" not in error.message.lower():
                    raise
                raise HorovodInternalError(error) from error

        def reset():
            hvd.shutdown()
            hvd.init()
        return run_fn(wrapper, reset)
    return decorate


class DataParallelRunner(ReplicaRunner):
    framework = "tf"

    def __init__(self, config, dataset, specs):
        hvd, self.threads, device = init_horovod(config)
        self.hvd = hvd
        self.memory = memory_meter(device)  # before the model
        self.feed = make_feed(config, device, dataset)
        apply_data_layout(self, hvd, config)
        self.collectives = HorovodCollectives(hvd)
        self.config, self.dataset = config, dataset
        self.keys = weights.expected_keys(specs, dataset.image_shape)
        self.ranges = [(0, len(specs))]  # one piece: the whole model
        set_precision(config)
        self.model = build_model(specs, dataset.image_shape, config.seed)
        self.model.recompute = config.recompute
        if config.sync_bn:  # Horovod: BatchNorm statistics of the global batch (allreduce has a gradient)
            set_batch_norm_reduction(self.model, lambda sums: hvd.allreduce(sums, op=hvd.Sum))
        self.variables = self.model.trainable_variables
        self.optimizer = Optimizer(self.variables, config)
        self.loss_scale_state = DynamicLossScale(config.loss_scale) if config.amp == Amp.FP16 else None
        channels, height, width = dataset.image_shape
        image_spec = tf.TensorSpec([None, height, width, channels], tf.float32)
        label_spec = tf.TensorSpec([None], tf.int64)
        self.drops = networks.drops(specs)  # then each step hands the model its samples' keys
        self._chunk_gradients = tf.function(self._chunk_gradients_eager, input_signature=[
            image_spec, label_spec, tf.TensorSpec([None], tf.int64), tf.TensorSpec([], tf.float32)])
        # Horovod: one allreduce, in buckets, inside the compiled step (see the docstring).
        self.in_graph = not config.adasum and config.accumulation_steps == 1
        self.buckets = gradient_buckets([variable.shape.num_elements() * 4 for variable in self.variables])
        flag_spec = tf.TensorSpec([1], tf.float32)
        self._reduced_step = tf.function(self._reduced_step_eager, input_signature=[
            image_spec, label_spec, tf.TensorSpec([None], tf.int64), tf.TensorSpec([], tf.float32), flag_spec])
        self._reduced_zeros = tf.function(
            lambda flag: self._reduce_in_graph([tf.zeros_like(variable) for variable in self.variables], flag),
            input_signature=[flag_spec])
        self._apply = tf.function(lambda gradients: self.optimizer.apply(gradients, self.variables))
        self._logits = tf.function(lambda images: tf.cast(self.model(images, training=False), tf.float32),
                                   input_signature=[image_spec])
        compression = self.hvd.Compression.fp16 if config.fp16_allreduce else self.hvd.Compression.none
        self._allreduce_kwargs = {"op": self.hvd.Adasum if config.adasum else self.hvd.Sum,
                                  "compression": compression}

    def _chunk_gradients_eager(self, images, labels, keys, scale):
        with tf.GradientTape() as tape:
            logits = tf.cast(self.model(images, training=True, dropout_keys=keys), tf.float32)  # the loss in fp32
            loss_sum, correct = loss_sum_and_correct(labels, logits)
            scaled = loss_sum * scale
        return tape.gradient(scaled, self.variables), loss_sum, correct

    def _reduced_step_eager(self, images, labels, keys, scale, flag):
        gradients, loss_sum, correct = self._chunk_gradients_eager(images, labels, keys, scale)
        reduced, flag_sum = self._reduce_in_graph(gradients, flag)
        return reduced, loss_sum, correct, flag_sum

    def _reduce_in_graph(self, gradients, flag):
        """Horovod: sum the gradients over the ranks, a group per bucket (the stop flag rides in
        the first), each group an op that starts once its gradients exist. The names are fixed,
        so the same buckets of zeros (an empty share) meet the other ranks' gradients."""
        reduced, flag_sum = list(gradients), None
        for number, bucket in enumerate(self.buckets):
            tensors = [gradients[index] for index in bucket] + ([flag] if number == 0 else [])
            summed = self.hvd.grouped_allreduce(tensors, name=f"gradient_bucket_{number}", **self._allreduce_kwargs)
            if number == 0:
                flag_sum = summed.pop()
            for index, gradient in zip(bucket, summed):
                reduced[index] = gradient
        return reduced, flag_sum

    def _step_arguments(self, batch, scale):
        """What the compiled steps take of a batch (or chunk): images, labels, dropout keys, scale."""
        return (self.feed.inputs(batch), self.feed.labels(batch), dropout_keys(self.config.seed, batch, self.drops),
                tf.constant(scale, tf.float32))

    def _step_in_graph(self, batch, scale, meter):
        """The step's gradients, already summed over the ranks (and the stop flag's sum)."""
        flag = self.collectives.pending_flag
        if batch.count == 0 and not self.config.sync_bn:
            # An empty share (last batch smaller than the ranks) contributes zeros to the allreduce.
            reduced, flag_sum = self._reduced_zeros(flag)
        else:
            reduced, loss_sum, correct, flag_sum = self._reduced_step(*self._step_arguments(batch, scale), flag)
            meter.add(loss_sum, correct, batch.scored)
        self.collectives.flag_total = float(flag_sum.numpy()[0])
        return reduced

    def _allreduce_gradients(self, gradients):
        collectives = self.collectives
        flag = collectives.pending_flag
        if self.config.adasum:
            # Horovod 0.28.1's grouped_allreduce breaks for Adasum (it reads an
            # unset variable), so reduce tensor by tensor there.
            collectives.flag_total = float(self.hvd.allreduce(flag, op=self.hvd.Sum, name="flag_sum").numpy()[0])
            return [self.hvd.allreduce(gradient, name=f"gradient_{index}", **self._allreduce_kwargs)
                    for index, gradient in enumerate(gradients)]
        # Horovod: sum every gradient (and the stop flag) over the ranks, in one fused group.
        *reduced, flag_sum = self.hvd.grouped_allreduce([*gradients, flag], **self._allreduce_kwargs)
        collectives.flag_total = float(flag_sum.numpy()[0])
        return reduced

    def set_lr(self, value):
        self.optimizer.lr.assign(value)

    def train_step(self, batch, global_count):
        """One optimizer step on this rank's ``batch`` of a global batch of ``global_count``;
        its sums stay tensors until the trainer reads them."""
        meter = DeviceMeter()
        batch = self.feed.arrive(batch)
        scale = 1.0 / max(1, batch.count) if self.config.adasum else 1.0 / global_count
        if self.loss_scale_state:  # --amp fp16: scale the loss up so small gradients survive fp16
            scale *= self.loss_scale_state.scale
        if self.in_graph:
            reduced = self._step_in_graph(batch, scale, meter)
        else:
            reduced = self._accumulated_and_reduced(batch, scale, meter)
        if self.loss_scale_state:
            # Horovod: after the allreduce every rank sees the same overflow, so all skip alike.
            reduced = [gradient / self.loss_scale_state.scale for gradient in reduced]
            finite = bool(tf.reduce_all([tf.reduce_all(tf.math.is_finite(gradient)) for gradient in reduced]))
            if not self.loss_scale_state.update(finite, self.primary):
                return meter.pending()
        self._apply(reduced)
        return meter.pending()

    def _accumulated_and_reduced(self, batch, scale, meter):
        """The chunks' gradients added up here, then summed over the ranks in one group."""
        total = [tf.zeros_like(variable) for variable in self.variables]
        for chunk in batch.parts(self.config.accumulation_steps):
            if chunk.count == 0 and not self.config.sync_bn:
                continue  # an empty share contributes zeros but still joins the allreduce
            # (with --sync-bn it runs the empty batch: every BatchNorm layer's allreduce needs it)
            gradients, loss_sum, correct = self._chunk_gradients(*self._step_arguments(chunk, scale))
            total = [a + b for a, b in zip(total, gradients)]
            meter.add(loss_sum, correct, chunk.scored)
        return self._allreduce_gradients(total)

    def average_batch_norm_statistics(self):
        average_batch_norm_statistics(self.hvd, self.model)

    def evaluate_slice(self, batches):
        meter = DeviceMeter()
        for batch in batches:
            batch = self.feed.arrive(batch)
            loss_sum, correct = loss_sum_and_correct(self.feed.labels(batch), self._logits(self.feed.inputs(batch)))
            meter.add(loss_sum, correct, batch.scored)
        return meter.pending()

    def loss_scale(self):
        return self.loss_scale_state

    def restore_loss_scale(self, state):
        if self.loss_scale_state:
            self.loss_scale_state = state

    def neutral_state(self):
        return neutral_state(self.model, self.dataset.image_shape, self.optimizer)

    def load_neutral_state(self, state):
        load_neutral_state(self.model, self.dataset.image_shape, self.optimizer, state)

    def broadcast_from_primary(self):
        # Horovod: every rank starts from rank 0's variables.
        self.hvd.broadcast_variables(self.all_variables(), root_rank=0)

    def all_variables(self):
        """Model and optimizer state. Keras 3 variables are not tf.Variables: Horovod takes
        their underlying .value."""
        return [variable.value for variable in self.model.variables] + self.optimizer.variables

    def run_elastic(self, start, train_from):
        """Horovod elastic (common/parallel/data_parallel.run_elastic) over the model's and optimizer's variables."""
        state = variables_state(self.hvd, self.all_variables(), epoch=0, step=0, started=False)
        return run_elastic(self, self.hvd, state, start, train_from, elastic_run(self.hvd))
