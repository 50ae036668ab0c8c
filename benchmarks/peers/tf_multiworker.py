"""TensorFlow MultiWorkerMirroredStrategy (the seed's strategy family) on the
seed CNN: the peer of our TensorFlow data mode. benchmarks/run.py starts one
process per worker with TF_CONFIG set:

    TF_CONFIG='{"cluster": {"worker": ["localhost:PORT0", "localhost:PORT1"]},
                "task": {"type": "worker", "index": I}}' python benchmarks/peers/tf_multiworker.py
"""

import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import tensorflow as tf  # noqa: E402
from common_bench import parse, report, synthetic_batch, timed_windows  # noqa: E402

from train_tf.model import build_model, to_channels_last  # noqa: E402


def main():
    args = parse()
    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    workers = strategy.num_replicas_in_sync
    index = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
    with strategy.scope():
        model = build_model(args.specs, args.image_shape, seed=0)
        optimizer = tf.keras.optimizers.SGD(learning_rate=args.lr, momentum=0.9)
    x, y = synthetic_batch(args.batch_size // workers, args.image_shape, seed=index)
    x, y = tf.constant(to_channels_last(x)), tf.constant(y)

    def replica_step(x, y):
        with tf.GradientTape() as tape:
            logits = model(x, training=True)
            loss = tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits)) / args.batch_size
        gradients = tape.gradient(loss, model.trainable_variables)
        # Summed over the workers by the strategy (ring all-reduce over gRPC on CPUs).
        gradients = tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, gradients)
        optimizer.apply_gradients(zip(gradients, model.trainable_variables))

    @tf.function
    def step():
        strategy.run(replica_step, args=(x, y))

    rates = timed_windows(step, args.windows, args.steps, args.batch_size)
    if index == 0:
        report(rates, world_size=workers)


if __name__ == "__main__":
    main()
