"""Where a rank computes: the GPU of its local rank when there is one, else the CPU.

Must run before TensorFlow executes its first operation.
"""

import tensorflow as tf


def pin_gpu(local_rank):
    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return "cpu"
    gpu = gpus[local_rank % len(gpus)]
    tf.config.set_visible_devices(gpu, "GPU")
    tf.config.experimental.set_memory_growth(gpu, True)  # share the card's memory politely
    return gpu.name
