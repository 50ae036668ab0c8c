"""TF and PyTorch models built from the same specs are the same model (no MPI).

Same weights and batch give the same logits (BatchNorm in eval and training
mode), the same loss gradients, the same optimizer steps; checkpoints move
between the frameworks without changing a single value.
"""

import copy

import numpy as np
import pytest
import tensorflow as tf
import torch
import torch.nn.functional as F

from common.core.config import RunConfig
from common.model import checkpoint, networks, weights
from tests.helpers import relative_difference
from train_tf import checkpoint as tf_checkpoint
from train_tf import model as tf_model
from train_tf.optimizer import Optimizer
from train_torch import checkpoint as torch_checkpoint
from train_torch import model as torch_model
from train_torch.optimizer import make_local_optimizer

TOLERANCE = 1e-4
CASES = [("cnn", (1, 8, 8)), ("cnn", (3, 12, 10)), ("resnet", (1, 8, 8)), ("resnet", (3, 12, 10))]


def twin_models(name, shape, stem="auto"):
    """A torch model and a TF model holding the torch model's weights (TF built from another seed)."""
    specs = networks.model_specs(name, shape, 10, stem) if isinstance(name, str) else name
    torch_net = torch_model.build_model(specs, shape, seed=1)
    tf_net = tf_model.build_model(specs, shape, seed=2)
    tf_model.load_neutral(tf_net, shape, torch_model.to_neutral(torch_net))
    return specs, torch_net, tf_net


def batch(shape, size=6):
    rng = np.random.default_rng(7)
    return rng.standard_normal((size, *shape)).astype(np.float32), rng.integers(0, 10, size)


def tf_step(tf_net, optimizer, x, y):
    with tf.GradientTape() as tape:
        logits = tf_net(tf.constant(x.transpose(0, 2, 3, 1)), training=True)
        loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(tf.constant(y), logits))
    optimizer.apply(tape.gradient(loss, tf_net.trainable_variables), tf_net.trainable_variables)


def torch_step(torch_net, optimizer, x, y):
    torch_net.train()
    optimizer.zero_grad()
    F.cross_entropy(torch_net(torch.from_numpy(x)), torch.from_numpy(y)).backward()
    optimizer.step()


@pytest.mark.parametrize("name,shape", CASES)
def test_layouts_cover_the_same_arrays(name, shape):
    specs, torch_net, tf_net = twin_models(name, shape)
    expected = sorted(weights.expected_keys(specs, shape))
    assert sorted(torch_model.to_neutral(torch_net)) == expected
    assert sorted(tf_model.to_neutral(tf_net, shape)) == expected
    assert sorted(weights.initial_weights(specs, shape, 0)) == expected


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("name,shape", CASES)
def test_same_logits(name, shape, training):
    _, torch_net, tf_net = twin_models(name, shape)
    x, _ = batch(shape)
    torch_net.train(training)
    with torch.no_grad():
        expected = torch_net(torch.from_numpy(x)).numpy()
    actual = tf_net(tf.constant(x.transpose(0, 2, 3, 1)), training=training).numpy()
    assert relative_difference(actual, expected) <= TOLERANCE


# Adam only without BatchNorm: BN makes some gradient directions of the conv
# before it exactly zero, leaving float noise that Adam's g / sqrt(v) turns
# into full +-lr steps of either sign, in any two implementations alike.
STEP_CASES = [(name, shape, optimizer, steps) for name, shape in CASES
              for optimizer, steps in [("sgd-plain", 1), ("sgd", 2), ("adam", 2)]
              if optimizer != "adam" or name == "cnn"]


@pytest.mark.parametrize("name,shape,optimizer,steps", STEP_CASES)
def test_same_gradients_and_optimizer_steps(name, shape, optimizer, steps):
    """Plain SGD with lr 1 makes the weight change the gradient itself; momentum,
    weight decay and Adam over two steps check the update rules; BatchNorm's
    running statistics must move identically too. SGD's changes are compared
    (stricter); Adam's new weights, since dividing by sqrt(v) magnifies the
    round-off of small gradients."""
    config = RunConfig(optimizer=optimizer.split("-")[0], lr=1.0 if optimizer == "sgd-plain" else 0.05,
                       momentum=0.0 if optimizer == "sgd-plain" else 0.9,
                       weight_decay=0.0 if optimizer == "sgd-plain" else 1e-3)
    _, torch_net, tf_net = twin_models(name, shape)
    before = torch_model.to_neutral(torch_net)
    torch_optimizer = make_local_optimizer(torch_net, config)
    tf_optimizer = Optimizer(tf_net.trainable_variables, config)
    x, y = batch(shape)
    for _ in range(steps):
        torch_step(torch_net, torch_optimizer, x, y)
        tf_step(tf_net, tf_optimizer, x, y)
    after_torch, after_tf = torch_model.to_neutral(torch_net), tf_model.to_neutral(tf_net, shape)
    for key in before:
        change = after_torch[key] - before[key]
        if key.endswith(("kernel", "bias", "gamma", "beta")):
            assert np.abs(change).max() > 0, f"{key} did not move"
        if optimizer == "adam":
            assert relative_difference(after_tf[key], after_torch[key]) <= TOLERANCE, key
        else:
            assert relative_difference(after_tf[key] - before[key], change) <= TOLERANCE, key


# Every network of the zoo at a small input, both stems, and the layers only they use.
# Training-mode BatchNorm over few values per channel amplifies round-off layer after
# layer, so the deep ones get enough pixels for their last stages (4x4 / 2x2 at 32 px).
ZOO = [("resnet18", (3, 16, 16), "auto"), ("resnet34", (3, 32, 32), "auto"), ("resnet50", (3, 32, 32), "auto"),
       ("vgg11", (3, 32, 32), "auto"), ("vgg11_bn", (3, 32, 32), "auto"), ("vgg16", (3, 32, 32), "auto"),
       ("vgg16_bn", (3, 32, 32), "auto"), ("mobilenet_v2", (3, 32, 32), "auto"),
       ("resnet18", (3, 38, 34), "imagenet"), ("mobilenet_v2", (1, 70, 66), "imagenet"),
       ([networks.ConvBN(6, 3, 2, bias=True), networks.MaxPool(3, 2, padding=1), networks.AdaptiveAvgPool(7),
         networks.Flatten(), networks.Dense(10)], (3, 20, 30), "upsampling adaptive pool"),
       ([networks.ConvBN(4, 3, 1, activation="relu6"), networks.AdaptiveAvgPool(3), networks.Flatten(),
         networks.Dense(10)], (2, 11, 7), "shrinking adaptive pool")]


@pytest.mark.heavy
@pytest.mark.parametrize("name,shape,stem", ZOO, ids=[f"{name if isinstance(name, str) else stem}-"
                                                      f"{'x'.join(map(str, shape))}" for name, shape, stem in ZOO])
def test_zoo_same_logits_gradients_and_step(name, shape, stem):
    """The same weights and batch: the same logits (eval and training mode), and one
    plain SGD step with lr 1 moves every weight by the same gradient in both."""
    _, torch_net, tf_net = twin_models(name, shape, stem)
    x, y = batch(shape, size=8)
    for training in (False, True):
        torch_net.train(training)
        with torch.no_grad():
            expected = torch_net(torch.from_numpy(x)).numpy()
        actual = tf_net(tf.constant(x.transpose(0, 2, 3, 1)), training=training).numpy()
        assert relative_difference(actual, expected) <= TOLERANCE, training
    config = RunConfig(optimizer="sgd", lr=1.0, momentum=0.0)
    tf_model.load_neutral(tf_net, shape, torch_model.to_neutral(torch_net))  # undo the statistics update
    before = torch_model.to_neutral(torch_net)
    exact = copy.deepcopy(torch_net).double()
    torch_step(torch_net, make_local_optimizer(torch_net, config), x, y)
    torch_step(exact, make_local_optimizer(exact, config), x.astype(np.float64), y)
    tf_step(tf_net, Optimizer(tf_net.trainable_variables, config), x, y)
    after_torch, after_tf = torch_model.to_neutral(torch_net), tf_model.to_neutral(tf_net, shape)
    after_exact = {key: tensor.detach().numpy() for key, tensor in torch_model.named_tensors(exact).items()}
    for key, value in before.items():
        change, tf_change = after_torch[key] - value, after_tf[key] - value
        if key.endswith("conv.bias"):  # BatchNorm subtracts it again: its gradient is 0 up to round-off
            assert max(np.abs(change).max(), np.abs(tf_change).max()) < 1e-5, key
            continue
        assert np.abs(change).max() > 0, f"{key} did not move"
        # Training-mode BatchNorm in deep networks costs float32 digits (ResNet-34's first layer:
        # ~2e-3 from the float64 gradient in torch; TF's kernels up to ~6e-3 in MobileNetV2, and
        # 1.1e-2 from float64 in ResNet-34's last BatchNorm on an AVX-512 EPYC), so the bound is
        # 2% or 4x torch's own float32 error; a wrong layer is off by O(1).
        own_error = relative_difference(change, after_exact[key] - value)
        assert relative_difference(tf_change, change) <= max(200 * TOLERANCE, 4 * own_error), key


def save_and_open(directory, state, name, shape, optimizer):
    """``state`` through the one checkpoint format: a shard, meta, commit, then read back whole."""
    architecture = checkpoint.architecture(name, shape, 10)
    path = checkpoint.checkpoint_path(str(directory), (1, 0))
    checkpoint.write_shard(checkpoint.temporary_path(path), 0, state)
    checkpoint.commit(checkpoint.temporary_path(path), path, checkpoint.make_meta(
        (1, 0), architecture, {"optimizer": optimizer}, 1, "either", {}, {}))
    shapes = weights.expected_shapes(networks.model_specs(name, shape, 10), shape)
    return checkpoint.Checkpoint(path, architecture, shapes).state(list(shapes), optimizer)


@pytest.mark.heavy
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_checkpoint_round_trip_torch_tf_torch(tmp_path, optimizer):
    name, shape = "resnet", (1, 8, 8)
    config = RunConfig(model=name, optimizer=optimizer)
    specs, torch_net, tf_net = twin_models(name, shape)
    torch_optimizer = make_local_optimizer(torch_net, config)
    torch_step(torch_net, torch_optimizer, *batch(shape))  # non-trivial BN statistics and optimizer state
    original = torch_checkpoint.neutral_state(torch_net, torch_optimizer)
    assert original.optimizer

    tf_optimizer = Optimizer(tf_net.trainable_variables, config)
    tf_checkpoint.load_neutral_state(tf_net, shape, tf_optimizer,
                                     save_and_open(tmp_path / "torch", original, name, shape, optimizer))
    through_tf = tf_checkpoint.neutral_state(tf_net, shape, tf_optimizer)
    back_net = torch_model.build_model(specs, shape, seed=5)
    back_optimizer = make_local_optimizer(back_net, config)
    torch_checkpoint.load_neutral_state(back_net, back_optimizer,
                                        save_and_open(tmp_path / "tf", through_tf, name, shape, optimizer))
    back = torch_checkpoint.neutral_state(back_net, back_optimizer)
    assert sorted(back.weights) == sorted(original.weights) and sorted(back.optimizer) == sorted(original.optimizer)
    for key, value in original.weights.items():
        assert np.array_equal(back.weights[key], value), key
    for key, slots in original.optimizer.items():
        for slot, value in slots.items():
            assert np.array_equal(back.optimizer[key][slot], value), (key, slot)
    # The restored optimizer steps on exactly as the original would.
    x, y = batch(shape)
    torch_step(torch_net, torch_optimizer, x, y)
    torch_step(back_net, back_optimizer, x, y)
    for key, value in torch_model.to_neutral(torch_net).items():
        assert np.array_equal(torch_model.to_neutral(back_net)[key], value), key


def torch_stage_pass(stage, x, upstream):
    inputs = torch.from_numpy(x).requires_grad_()
    out = stage(inputs)
    out.backward(torch.from_numpy(upstream))
    gradients = {key: tensor.grad.numpy() for key, tensor in torch_model.named_tensors(stage).items()
                 if tensor.grad is not None}
    return out.detach().numpy(), inputs.grad.numpy(), gradients


def tf_stage_pass(stage, in_shape, x, upstream):
    inputs = tf.constant(tf_model.to_channels_last(x))
    with tf.GradientTape() as tape:
        tape.watch(inputs)
        out = stage(inputs, training=True)
    variables = tf_model._variables(stage, in_shape)
    trainable = {key: entry for key, entry in variables.items() if entry[0].trainable}
    grads = tape.gradient(out, [inputs] + [entry[0] for entry in trainable.values()],
                          output_gradients=tf.constant(tf_model.to_channels_last(upstream)))
    gradients = {key: (from_tf(g.numpy()) if from_tf else g.numpy())
                 for (key, (_, _, from_tf)), g in zip(trainable.items(), grads[1:])}
    return (tf_model.to_channels_first(out.numpy()), tf_model.to_channels_first(grads[0].numpy()), gradients)


@pytest.mark.heavy
@pytest.mark.parametrize("name,shape", CASES)
def test_pipeline_stages_compute_the_same_in_both_frameworks(name, shape):
    """The same split, weights and batch: the same stage activations, input
    gradients and parameter gradients (what crosses the wire is channel-first)."""
    from common.parallel.plan import partition

    specs = networks.model_specs(name, shape, 10)
    shapes = networks.layer_shapes(specs, shape)
    rng = np.random.default_rng(3)
    for start, end in partition([cost.flops for cost in networks.layer_costs(specs, shape)], 3):
        x = rng.standard_normal((5, *shapes[start])).astype(np.float32)
        upstream = rng.standard_normal((5, *shapes[end])).astype(np.float32)
        torch_out, torch_in_grad, torch_grads = torch_stage_pass(
            torch_model.build_stage(specs, shape, 4, start, end), x, upstream)
        tf_out, tf_in_grad, tf_grads = tf_stage_pass(
            tf_model.build_stage(specs, shape, 4, start, end), shapes[start], x, upstream)
        assert relative_difference(tf_out, torch_out) <= TOLERANCE
        assert relative_difference(tf_in_grad, torch_in_grad) <= TOLERANCE
        assert sorted(tf_grads) == sorted(torch_grads)
        for key, value in torch_grads.items():
            assert relative_difference(tf_grads[key], value) <= TOLERANCE, key


@pytest.mark.heavy
@pytest.mark.parametrize("name,shape", [("resnet8", (3, 16, 16)), ("vgg11_bn", (3, 32, 32))])
def test_bf16_logits_and_step_agree_within_bf16_tolerance(name, shape):
    """--amp bf16: torch.autocast and Keras' mixed_bfloat16 policy round the same
    convolutions and matmuls to bf16 (8 bits of mantissa, ~4e-3), BatchNorm and the
    loss in float32: the two frameworks agree to bf16's precision, and both differ
    from float32 by more than float32 round-off (autocast and the policy really are on)."""
    import keras

    from train_torch.precision import autocast

    specs = networks.model_specs(name, shape, 10)
    torch_net = torch_model.build_model(specs, shape, seed=1)
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        tf_net = tf_model.build_model(specs, shape, seed=2)
    finally:
        keras.config.set_dtype_policy("float32")
    tf_model.load_neutral(tf_net, shape, torch_model.to_neutral(torch_net))
    x, y = batch(shape, size=8)
    config = RunConfig(optimizer="sgd", lr=1.0, momentum=0.0, amp="bf16")
    torch_net.train()
    with torch.no_grad():
        full = torch_net(torch.from_numpy(x)).numpy()
        with autocast(config, torch.device("cpu")):
            torch_logits = torch_net(torch.from_numpy(x)).float().numpy()
    tf_logits = tf.cast(tf_net(tf.constant(x.transpose(0, 2, 3, 1)), training=True), tf.float32).numpy()
    # Each framework's bf16 logits differ from float32 by bf16's own rounding (which a CPU's
    # bf16 kernels accumulate in their own order); two such roundings lie at most about twice
    # that apart, and 3% at least where the effect is small.
    bf16_logits_effect = relative_difference(torch_logits, full)
    assert bf16_logits_effect > 10 * TOLERANCE
    assert relative_difference(tf_logits, full) > 10 * TOLERANCE
    assert relative_difference(tf_logits, torch_logits) <= max(3e-2, 2 * bf16_logits_effect), bf16_logits_effect

    tf_model.load_neutral(tf_net, shape, torch_model.to_neutral(torch_net))
    before = torch_model.to_neutral(torch_net)
    in_float32 = copy.deepcopy(torch_net)
    for net, precision in ((in_float32, RunConfig(optimizer="sgd", lr=1.0, momentum=0.0)), (torch_net, config)):
        optimizer = make_local_optimizer(net, precision)
        optimizer.zero_grad()
        with autocast(precision, torch.device("cpu")):
            loss = F.cross_entropy(net(torch.from_numpy(x)).float(), torch.from_numpy(y))
        loss.backward()
        optimizer.step()
    with tf.GradientTape() as tape:
        logits = tf.cast(tf_net(tf.constant(x.transpose(0, 2, 3, 1)), training=True), tf.float32)
        tf_loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(tf.constant(y), logits))
    Optimizer(tf_net.trainable_variables, config).apply(tape.gradient(tf_loss, tf_net.trainable_variables),
                                                        tf_net.trainable_variables)
    after = {"torch": torch_model.to_neutral(torch_net), "tf": tf_model.to_neutral(tf_net, shape),
             "float32": torch_model.to_neutral(in_float32)}
    change = {name: np.concatenate([state[key].ravel() - value.ravel() for key, value in before.items()
                                    if key.endswith("kernel")]) for name, state in after.items()}
    # A deep BatchNorm network's step is chaotic under bf16 (VGG-11-BN at batch 8: PyTorch's own
    # bf16 step is ~30% from its float32 step), so the frameworks are held to bf16's own effect:
    # no further from each other than PyTorch's bf16 step is from float32 (and 5% at most where
    # that effect is small, as on ResNet-8).
    bf16_effect = relative_difference(change["torch"], change["float32"])
    assert relative_difference(change["tf"], change["torch"]) <= max(5e-2, 1.5 * bf16_effect), bf16_effect
