"""--amp: Keras mixed precision (bf16) for TensorFlow's layers.

Keras' "mixed_bfloat16" policy keeps variables float32 and computes in bf16;
train_tf/model.py's BatchNorm stays float32 throughout and the logits are cast
back to float32 before the loss, as PyTorch's autocast does. fp16 (which needs
loss scaling) is PyTorch-only here: TensorFlow is refused with one line.
"""

import keras

from common.errors import UsageError

POLICIES = {"off": "float32", "bf16": "mixed_bfloat16"}


def set_precision(config):
    """Before any layer is built: the dtype policy every layer takes."""
    if config.amp not in POLICIES:
        raise UsageError(f"--amp {config.amp} is PyTorch-only (train_torch/main.py); TensorFlow trains "
                         "with --amp bf16, which needs no loss scaling")
    keras.config.set_dtype_policy(POLICIES[config.amp])
