"""TensorFlow model and optimizer <-> the neutral state that common/model/checkpoint.py stores.

The files themselves are written and read by common/model/checkpoint.py (safetensors +
JSON, the same for both frameworks); this only converts variables to and from
it (TF's kernel layouts to the channel-first neutral ones, and back).
"""

from common.model.checkpoint import NeutralState
from train_tf.model import load_neutral, to_neutral
from train_tf.optimizer import load_optimizer_neutral, optimizer_to_neutral


def neutral_state(model, input_shape, optimizer=None) -> NeutralState:
    """Weights and BatchNorm statistics, and the optimizer's slots under torch.optim's names."""
    slots = (optimizer_to_neutral(model, input_shape, optimizer, model.trainable_variables)
             if optimizer is not None else {})
    return NeutralState(to_neutral(model, input_shape), slots)


def load_neutral_state(model, input_shape, optimizer, state: NeutralState) -> None:
    load_neutral(model, input_shape, state.weights)
    if optimizer is not None and state.optimizer:
        load_optimizer_neutral(model, input_shape, optimizer, model.trainable_variables, state.optimizer)
