"""SGD and Adam with PyTorch's exact update rules, as TensorFlow variables.

Keras' optimizers differ from PyTorch's in ways that change results (SGD's
momentum form under a changing LR, decoupled weight decay, Adam's epsilon), so
the same run in both frameworks would drift apart; these match torch.optim.
"""

import numpy as np
import tensorflow as tf


class Optimizer:
    def __init__(self, variables, config):
        self.kind = config.optimizer
        self.momentum, self.weight_decay = config.momentum, config.weight_decay
        self.lr = tf.Variable(config.lr, trainable=False, dtype=tf.float32, name="lr")
        self.steps = tf.Variable(0, trainable=False, dtype=tf.int64, name="steps")
        def zeros(name):
            return [tf.Variable(tf.zeros(v.shape, v.dtype), trainable=False, name=name) for v in variables]
        self.slots = {}
        if self.kind == "sgd" and self.momentum:
            self.slots["momentum_buffer"] = zeros("momentum_buffer")
        if self.kind == "adam":
            self.slots["exp_avg"], self.slots["exp_avg_sq"] = zeros("exp_avg"), zeros("exp_avg_sq")

    @property
    def variables(self):
        return [self.steps] + [slot for slots in self.slots.values() for slot in slots]

    def apply(self, gradients, variables):
        """One update; call inside tf.function."""
        self.steps.assign_add(1)
        for index, (gradient, variable) in enumerate(zip(gradients, variables)):
            if self.weight_decay:
                gradient = gradient + self.weight_decay * variable
            if self.kind == "adam":
                self._adam(index, gradient, variable)
            elif self.momentum:
                buffer = self.slots["momentum_buffer"][index]
                # torch: buf = momentum * buf + grad (buf starts at the first grad)
                buffer.assign(self.momentum * buffer + gradient)
                variable.assign_sub(self.lr * buffer)
            else:
                variable.assign_sub(self.lr * gradient)

    def _adam(self, index, gradient, variable, beta1=0.9, beta2=0.999, epsilon=1e-8):
        mean, square = self.slots["exp_avg"][index], self.slots["exp_avg_sq"][index]
        mean.assign(beta1 * mean + (1 - beta1) * gradient)
        square.assign(beta2 * square + (1 - beta2) * gradient * gradient)
        step = tf.cast(self.steps, tf.float32)
        correction1, correction2 = 1 - beta1 ** step, 1 - beta2 ** step
        denominator = tf.sqrt(square) / tf.sqrt(correction2) + epsilon
        variable.assign_sub(self.lr / correction1 * mean / denominator)


def _slot_index(model, input_shape, variables):
    """{neutral key: (index into the optimizer's variables, layout from TF)}."""
    from train_tf.model import _variables

    positions = {id(variable): index for index, variable in enumerate(variables)}
    return {key: (positions[id(variable)], from_tf)
            for key, (variable, _, from_tf) in _variables(model, input_shape).items()
            if id(variable) in positions}


def optimizer_to_neutral(model, input_shape, optimizer, variables):
    """The optimizer's per-parameter state keyed by the neutral weight names, in the
    neutral layout and with torch.optim's names (so either framework can resume it)."""
    states = {}
    for key, (index, from_tf) in _slot_index(model, input_shape, variables).items():
        state = {name: (from_tf or (lambda a: a))(slots[index].numpy()) for name, slots in optimizer.slots.items()}
        if optimizer.kind == "adam":
            state["step"] = np.array(float(optimizer.steps.numpy()), dtype=np.float32)
        if state:
            states[key] = state
    return states


def load_optimizer_neutral(model, input_shape, optimizer, variables, states):
    from train_tf.model import _variables

    layouts = {key: to_tf for key, (_, to_tf, _) in _variables(model, input_shape).items()}
    for key, (index, _) in _slot_index(model, input_shape, variables).items():
        for name, value in states.get(key, {}).items():
            if name == "step":
                optimizer.steps.assign(int(value))
            elif name in optimizer.slots:
                to_tf = layouts[key]
                optimizer.slots[name][index].assign(to_tf(value) if to_tf else value)
