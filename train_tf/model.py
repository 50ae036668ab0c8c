"""Keras 3 layers built from common/model/networks.py layer specs (NHWC inside).

The layers compute exactly what train_torch/model.py computes, so weights move
between frameworks through common/model/weights.py: explicit symmetric padding at
every stride, BatchNorm with PyTorch's semantics, and Flatten in channel-first
order. Nothing here knows about distribution.
"""

import contextlib

import keras
import tensorflow as tf

from common.model import dropout, networks, weights

BN_MOMENTUM = 0.1  # PyTorch's convention: new = (1 - m) * old + m * batch
BN_EPSILON = 1e-5


class _Statistics:
    frozen = False  # read while a tf.function traces: True leaves the update out of that graph


@contextlib.contextmanager
def frozen_batch_norm_statistics():
    """Inside: training-mode BatchNorm normalises by the batch but does not move its
    running statistics (a pipeline stage recomputing a forward pass it already ran)."""
    previous, _Statistics.frozen = _Statistics.frozen, True
    try:
        yield
    finally:
        _Statistics.frozen = previous


class _WeightLayers:
    records: list | None = None  # while a split backward's forward traces (recording_weight_layers)


@contextlib.contextmanager
def recording_weight_layers():
    """Inside: each convolution and dense layer that runs appends (Keras layer, its input, its
    output) to the list this yields, so that a backward cut in two (--schedule zb) can take
    the outputs' gradients first and the layers' weight gradients from them later."""
    previous, _WeightLayers.records = _WeightLayers.records, []
    try:
        yield _WeightLayers.records
    finally:
        _WeightLayers.records = previous


def _weighted(layer, x):
    y = layer(x)
    if _WeightLayers.records is not None:
        _WeightLayers.records.append((layer, x, y))
    return y


class TorchBatchNorm(keras.layers.Layer):
    """BatchNorm as PyTorch defines it: normalise with the biased batch variance,
    track the unbiased one (Keras' own layer tracks the biased variance). Always
    computes in float32, also under mixed precision.

    With ``reduce_sums`` set (a differentiable sum over the data-parallel replicas,
    see set_batch_norm_reduction), training uses the statistics of the GLOBAL batch,
    with train_torch/model.py's BatchNorm's maths (sums around the running mean)."""

    reduce_sums = None

    def __init__(self, **kwargs):
        super().__init__(dtype="float32", **kwargs)

    def build(self, input_shape):
        channels = input_shape[-1]
        self.gamma = self.add_weight(shape=(channels,), initializer="ones", name="gamma")
        self.beta = self.add_weight(shape=(channels,), initializer="zeros", name="beta")
        self.moving_mean = self.add_weight(shape=(channels,), initializer="zeros", trainable=False,
                                           name="moving_mean")
        self.moving_var = self.add_weight(shape=(channels,), initializer="ones", trainable=False,
                                          name="moving_var")

    def call(self, x, training=False):
        if not training:
            return tf.nn.batch_normalization(x, self.moving_mean, self.moving_var, self.beta,
                                             self.gamma, BN_EPSILON)
        if self.reduce_sums is None:
            mean = tf.reduce_mean(x, [0, 1, 2])
            variance = tf.reduce_mean(tf.square(x - mean), [0, 1, 2])
            count = tf.cast(tf.reduce_prod(tf.shape(x)[:3]), x.dtype)
        else:
            mean, variance, count = self._global_moments(x)
        unbiased = variance * count / tf.maximum(count - 1.0, 1.0)
        if not _Statistics.frozen:
            self.moving_mean.assign((1 - BN_MOMENTUM) * self.moving_mean + BN_MOMENTUM * mean)
            self.moving_var.assign((1 - BN_MOMENTUM) * self.moving_var + BN_MOMENTUM * unbiased)
        # (x - mean) * scale, not tf.nn.batch_normalization's x * scale - mean * scale,
        # whose cancellation costs digits in the gradients when |mean| >> std.
        return (x - mean) * (tf.math.rsqrt(variance + BN_EPSILON) * self.gamma) + self.beta

    def _global_moments(self, x):
        shift = tf.identity(self.moving_mean)
        centred = x - shift
        count = tf.cast(tf.reduce_prod(tf.shape(x)[:3]), tf.float32)
        total = self.reduce_sums(tf.concat([tf.reduce_sum(centred, [0, 1, 2]),
                                            tf.reduce_sum(tf.square(centred), [0, 1, 2]), [count]], 0))
        channels = tf.shape(shift)[0]
        samples = total[-1]
        shifted_mean = total[:channels] / samples
        variance = total[channels:2 * channels] / samples - tf.square(shifted_mean)
        return shifted_mean + shift, variance, samples


ACTIVATIONS = {"relu": tf.nn.relu, "relu6": tf.nn.relu6, "": None}


def _conv2d(spec, use_bias):
    # Explicit symmetric padding: Keras' 'same' pads asymmetrically at stride 2.
    if getattr(spec, "depthwise", False):
        return keras.layers.DepthwiseConv2D(spec.kernel, strides=spec.stride, padding="valid",
                                            use_bias=use_bias)
    return keras.layers.Conv2D(spec.filters, spec.kernel, strides=spec.stride, padding="valid",
                               use_bias=use_bias)


class ConvLayer(keras.layers.Layer):
    """A Conv spec (bias, optional ReLU) or a ConvBN spec (BatchNorm, activation)."""

    def __init__(self, spec, **kwargs):
        super().__init__(**kwargs)
        batch_norm = isinstance(spec, networks.ConvBN)
        self.pad = spec.kernel // 2
        self.conv = _conv2d(spec, use_bias=spec.bias if batch_norm else True)
        self.bn = TorchBatchNorm() if batch_norm else None
        self.activation = spec.activation if batch_norm else ("relu" if spec.relu else "")

    def call(self, x, training=False):
        if self.pad:
            x = tf.pad(x, [[0, 0], [self.pad, self.pad], [self.pad, self.pad], [0, 0]])
        x = _weighted(self.conv, x)
        if self.bn is not None:
            x = tf.cast(self.bn(x, training=training), x.dtype)
        return ACTIVATIONS[self.activation](x) if self.activation else x


class BlockLayer(keras.layers.Layer):
    """Any common/model/networks.py block: its path of ConvBN parts in order, plus the
    shortcut (projection, identity or none), then ReLU if the block has one."""

    def __init__(self, spec, in_shape, **kwargs):
        super().__init__(**kwargs)
        self.path_names = [name for name, _ in spec.path(in_shape)]
        for name, part, _ in spec.parts(in_shape):
            setattr(self, name, ConvLayer(part))
        if spec.projection(in_shape) is None:
            self.projection = None
        self.identity = spec.identity(in_shape)
        self.final_relu = spec.final_relu

    def call(self, x, training=False):
        out = x
        for name in self.path_names:
            out = getattr(self, name)(out, training=training)
        if self.projection is not None:
            out = out + self.projection(x, training=training)
        elif self.identity:
            out = out + x
        return tf.nn.relu(out) if self.final_relu else out


class DenseLayer(keras.layers.Layer):
    """Dense, optional ReLU; while training with ``dropout_keys`` (a batch's sample keys,
    common/model/dropout.py) and a rate, the input first loses the units its masks drop."""

    def __init__(self, spec, layer_index, **kwargs):
        super().__init__(**kwargs)
        self.linear = keras.layers.Dense(spec.units)
        self.relu = spec.relu
        self.rate, self.layer_index = spec.dropout, layer_index

    def call(self, x, training=False, dropout_keys=None):
        if training and self.rate and dropout_keys is not None:
            x = x * seeded_dropout_mask(dropout_keys, x.shape[-1], self.layer_index, self.rate, x.dtype)
        x = _weighted(self.linear, x)
        return tf.nn.relu(x) if self.relu else x


def seeded_dropout_mask(keys, features, layer_index, rate, dtype):
    """(samples, features): 0 for a dropped unit, 1 / (1 - rate) for a kept one."""
    kept = dropout.keep(keys, tf.range(features, dtype=tf.int64), layer_index, rate, tf.bitwise.bitwise_xor)
    return tf.cast(tf.where(kept, dropout.scale(rate), 0.0), dtype)


class ChannelFirstFlatten(keras.layers.Layer):
    """Flatten in (C, H, W) order, as the specs (and PyTorch) define it."""

    def call(self, x, training=False):
        # The features as a number: with the batch's size unknown (a compiled step traced
        # for several micro-batch sizes), [size, -1] would leave them unknown as well, and
        # the next layer's dropout mask needs them.
        features = x.shape[1] * x.shape[2] * x.shape[3]
        return tf.reshape(tf.transpose(x, [0, 3, 1, 2]), [-1, features])


class MaxPoolLayer(keras.layers.Layer):
    def __init__(self, spec, **kwargs):
        super().__init__(**kwargs)
        self.size, self.stride, self.pad = spec.size, spec.stride or spec.size, spec.padding

    def call(self, x, training=False):
        if self.pad:  # padding never wins the max, as in PyTorch
            x = tf.pad(x, [[0, 0], [self.pad, self.pad], [self.pad, self.pad], [0, 0]],
                       constant_values=float("-inf"))
        return tf.nn.max_pool2d(x, self.size, self.stride, "VALID")


class AdaptiveAvgPoolLayer(keras.layers.Layer):
    """PyTorch's AdaptiveAvgPool2d: a fixed averaging matrix along each axis."""

    def __init__(self, spec, in_shape, **kwargs):
        super().__init__(**kwargs)
        self.rows = tf.constant(networks.adaptive_pool_matrix(in_shape[1], spec.size), tf.float32)
        self.cols = tf.constant(networks.adaptive_pool_matrix(in_shape[2], spec.size), tf.float32)

    def call(self, x, training=False):
        return tf.einsum("nhwc,ih,jw->nijc", x, tf.cast(self.rows, x.dtype), tf.cast(self.cols, x.dtype))


class GlobalAvgPoolLayer(keras.layers.Layer):
    def call(self, x, training=False):
        return tf.reduce_mean(x, axis=[1, 2])


def build_layer(spec, in_shape, index):
    """The layer of ``spec``, the model's ``index``-th (dropout masks are keyed by it)."""
    if isinstance(spec, networks.Conv):
        return ConvLayer(spec)
    if isinstance(spec, networks.ConvBN):
        return ConvLayer(spec)
    if isinstance(spec, networks.BLOCKS):
        return BlockLayer(spec, in_shape)
    if isinstance(spec, networks.MaxPool):
        return MaxPoolLayer(spec)
    if isinstance(spec, networks.AdaptiveAvgPool):
        return AdaptiveAvgPoolLayer(spec, in_shape)
    if isinstance(spec, networks.GlobalAvgPool):
        return GlobalAvgPoolLayer()
    if isinstance(spec, networks.Flatten):
        return ChannelFirstFlatten()
    if isinstance(spec, networks.Dense):
        return DenseLayer(spec, index)
    raise TypeError(f"no Keras layer for spec {spec!r}")


def dropout_keys(seed, batch, drops):
    """The sample keys of a training batch's seeded dropout masks (int64); none (an empty
    tensor, which the compiled steps take alike) when the model does not drop."""
    if not drops:
        return tf.zeros([0], tf.int64)
    return tf.constant(dropout.sample_keys(seed, batch.epoch, batch.indices))


class SpecModel(keras.Model):
    """The layers of the specs in order (the whole model's from ``first_index`` on);
    ``layers_`` is what a pipeline stage slices. ``dropout_keys`` (int64, one per sample)
    reach the layers that drop; without them (evaluation, timing) nothing drops."""

    def __init__(self, specs, input_shape, first_index=0, **kwargs):
        super().__init__(**kwargs)
        shapes = networks.layer_shapes(specs, input_shape)
        self.specs = list(specs)
        self.layers_ = [build_layer(spec, shapes[i], first_index + i) for i, spec in enumerate(specs)]

    recompute = False  # --recompute: keep only each layer's input for the backward (set by the runner)

    def call(self, x, training=False, dropout_keys=None):
        for layer in self.layers_:
            def run(inputs, layer=layer):
                if isinstance(layer, DenseLayer):
                    return layer(inputs, training=training, dropout_keys=dropout_keys)
                return layer(inputs, training=training)
            x = recomputed(run, layer, x) if self.recompute and training else run(x)
        return x


def recomputed(run, layer, x):
    """``run(x)``, whose backward runs ``run`` again from ``x`` under a tape of its own instead
    of keeping what the forward computed (BatchNorm's running statistics left as the first
    run moved them; the same dropout keys draw the same masks)."""
    @tf.custom_gradient
    def forward(inputs):
        def backward(upstream, variables=None):
            # A zero that depends on the gradient: the recomputation waits for it, and the
            # graph cannot merge it with the forward's identical ops (tf.recompute_grad's way).
            first = tf.cast(tf.reduce_max(tf.reshape(upstream, [-1])[:1]), tf.bool)
            zero = tf.where(first == first, 0.0, float("nan"))  # always 0, but not to the graph
            again_from = inputs + tf.cast(zero, inputs.dtype)
            with tf.GradientTape() as tape:
                tape.watch(again_from)
                with frozen_batch_norm_statistics():
                    again = run(again_from)
            found = list(variables or layer.trainable_variables)
            gradients = tape.gradient(again, [again_from, *found], output_gradients=upstream,
                                      unconnected_gradients=tf.UnconnectedGradients.ZERO)
            return gradients[0], gradients[1:]
        return run(inputs), backward
    return forward(x)


def set_batch_norm_reduction(model, reduce_sums):
    """Give every BatchNorm layer ``reduce_sums`` (a differentiable sum of a 1-D tensor
    over the replicas that share a batch), or None for per-replica statistics."""
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, TorchBatchNorm):
            layer.reduce_sums = reduce_sums


def batch_norm_statistics(model) -> list:
    """The running means and variances of every BatchNorm layer."""
    return [variable for layer in model._flatten_layers(include_self=False, recursive=True)
            if isinstance(layer, TorchBatchNorm) for variable in (layer.moving_mean, layer.moving_var)]


def build_model(specs, input_shape, seed):
    """Model for NCHW ``input_shape`` (fed NHWC), with common/model/weights.py's initial
    weights for ``seed`` (the same weights on every rank and in both frameworks)."""
    return build_stage(specs, input_shape, seed, 0, len(specs))


# --- The neutral weight layout (common/model/weights.py) ------------------------------

def _part_layers(layer, spec, in_shape):
    parts = weights.layer_parts(spec, in_shape)
    if isinstance(spec, networks.BLOCKS):
        return [(name, getattr(layer, name), part) for name, part, _ in parts]
    return [(name, layer, part) for name, part, _ in parts]


def _part_arrays(layer, part):
    if isinstance(part, networks.Dense):
        kernel, bias = layer.linear.kernel, layer.linear.bias
        return {"kernel": (kernel, weights.dense_kernel_to_tf, weights.dense_kernel_from_tf),
                "bias": (bias, None, None)}
    if getattr(part, "depthwise", False):
        conv = {"kernel": (layer.conv.kernel, weights.depthwise_kernel_to_tf, weights.depthwise_kernel_from_tf)}
    else:
        conv = {"kernel": (layer.conv.kernel, weights.conv_kernel_to_tf, weights.conv_kernel_from_tf)}
    if layer.conv.use_bias:
        conv["bias"] = (layer.conv.bias, None, None)
    if layer.bn is None:
        return conv
    bn = layer.bn
    return {**{"conv." + key: entry for key, entry in conv.items()}, "bn.gamma": (bn.gamma, None, None),
            "bn.beta": (bn.beta, None, None), "bn.mean": (bn.moving_mean, None, None),
            "bn.var": (bn.moving_var, None, None)}


def _variables(model, input_shape):
    """{neutral key: (variable, to_tf, from_tf)} for every array of the layout."""
    found = {}
    shapes = networks.layer_shapes(model.specs, input_shape)
    for index, (layer, spec) in enumerate(zip(model.layers_, model.specs)):
        for name, part_layer, part in _part_layers(layer, spec, shapes[index]):
            prefix = f"{index}.{name + '.' if name else ''}"
            for key, entry in _part_arrays(part_layer, part).items():
                found[prefix + key] = entry
    return found


def to_neutral(model, input_shape):
    return {key: (from_tf(variable.numpy()) if from_tf else variable.numpy())
            for key, (variable, _, from_tf) in _variables(model, input_shape).items()}


def load_neutral(model, input_shape, arrays):
    for key, (variable, to_tf, _) in _variables(model, input_shape).items():
        variable.assign(to_tf(arrays[key]) if to_tf else arrays[key])


def to_channels_last(array):
    """NCHW (common's layout, and the wire between stages) -> NHWC; other ranks pass through."""
    return array.transpose(0, 2, 3, 1) if array.ndim == 4 else array


def to_channels_first(array):
    return array.transpose(0, 3, 1, 2) if array.ndim == 4 else array


def build_stage(specs, input_shape, seed, start, end):
    """Layers start..end-1 of the model, holding exactly the whole model's initial weights."""
    shapes = networks.layer_shapes(specs, input_shape)
    stage = SpecModel(specs[start:end], shapes[start], start)
    channels_last = shapes[start][1:] + shapes[start][:1] if len(shapes[start]) == 3 else shapes[start]
    stage(tf.zeros((1, *channels_last)))  # create the variables
    load_neutral(stage, shapes[start],
                 weights.stage_arrays(weights.initial_weights(specs, input_shape, seed), start, end))
    return stage
