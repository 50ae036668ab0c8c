"""Where a rank computes: the GPU of its local rank when there is one, else the CPU.

Must run before TensorFlow executes its first operation.
"""

import tensorflow as tf

from common.observe.memory import ResidentMemory


def pin_gpu(local_rank):
    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return "cpu"
    gpu = gpus[local_rank % len(gpus)]
    tf.config.set_visible_devices(gpu, "GPU")
    tf.config.experimental.set_memory_growth(gpu, True)  # share the card's memory politely
    return gpu.name


class GpuMemory:
    """What TensorFlow's allocator has handed out on the rank's GPU. TensorFlow tells no
    card's capacity, so --mode auto's default budget stays the host's share there."""
    kind = "GPU allocated"
    on_accelerator = True
    device_bytes = None
    devices = 1

    def __init__(self, device: str):
        self.device = device.replace("/physical_device:", "")  # "GPU:0", as get_memory_info names it
        self.baseline = tf.config.experimental.get_memory_info(self.device)["current"]

    def peak(self) -> int:
        return tf.config.experimental.get_memory_info(self.device)["peak"]


def memory_meter(device: str):
    """The rank's memory meter (common/observe/memory.py): the GPU's allocator, or the
    process's resident memory."""
    if device == "cpu":
        warm_up_kernels()
        return ResidentMemory()
    return GpuMemory(device)


def warm_up_kernels():
    """A tiny compiled training step through a convolution, BatchNorm, ReLU, max-pool and a
    dense layer: the runtime's first functions and kernels belong to the baseline."""
    import keras

    conv, norm, dense = keras.layers.Conv2D(4, 3, padding="same"), keras.layers.BatchNormalization(), \
        keras.layers.Dense(2)

    @tf.function
    def step(images):
        with tf.GradientTape() as tape:
            pooled = tf.nn.max_pool2d(tf.nn.relu(norm(conv(images), training=True)), 2, 2, "VALID")
            loss = tf.reduce_sum(dense(tf.reshape(pooled, (2, -1))))
        return tape.gradient(loss, conv.trainable_variables + norm.trainable_variables + dense.trainable_variables)
    step(tf.random.normal((2, 8, 8, 3)))
