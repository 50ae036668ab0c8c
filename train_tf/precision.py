"""--amp: Keras mixed precision (bf16 or fp16) for TensorFlow's layers.

Keras' "mixed_bfloat16"/"mixed_float16" policies keep variables float32 and
compute in the low precision; train_tf/model.py's BatchNorm stays float32
throughout and the logits are cast back to float32 before the loss, as
PyTorch's autocast does. fp16's loss scaling is the data-parallel runner's
(common/model/loss_scale.py).
"""

import keras

POLICIES = {"off": "float32", "bf16": "mixed_bfloat16", "fp16": "mixed_float16"}


def set_precision(config):
    """Before any layer is built: the dtype policy every layer takes."""
    keras.config.set_dtype_policy(POLICIES[config.amp])
