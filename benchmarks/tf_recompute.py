"""What TensorFlow's recomputed forward costs a pipeline stage, and what keeping the
forward's intermediates instead costs: one stage (the first half of a network cut as
--balance time cuts it for 2 stages), one micro-batch, three ways, each timed as the
median of --repeats steps after a warm-up.

- recompute and kept run train_tf/stage.py's own code (TfStage.microbatch_seconds):
  - recompute: the compiled forward, then a compiled backward that runs the forward
    again under a tape and takes the gradients given the output gradient;
  - kept: the compiled forward called under an eager tape, so TensorFlow's function
    keeps its intermediates for the tape, and tape.gradient given the output gradient;
- one function: forward and backward in one compiled call, given the output gradient
  up front: what a stage would cost if nothing stood between its forward and backward
  (a floor, not a schedule a pipeline can run).

    python benchmarks/tf_recompute.py --model resnet18 --image 32 --microbatch 8
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from common.core import metrics  # noqa: E402
from common.core.config import parse_config  # noqa: E402
from common.core.runner import StagePlace  # noqa: E402
from common.model import networks  # noqa: E402
from common.parallel import plan  # noqa: E402
from train_tf.stage import TfStage, channels_first, channels_last  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--image", type=int, default=32)
    parser.add_argument("--microbatch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    shape = (3, args.image, args.image)
    specs = networks.model_specs(args.model, shape, 10)
    forward_costs, last_costs = plan.timed_costs(TfStage.measure_layer_times(specs, shape, args.microbatch), True)
    (start, end), _ = plan.partition(forward_costs, 2, last_costs=last_costs)
    config = parse_config(["--model", args.model, "--batch-size", str(args.microbatch)])
    stage = TfStage(StagePlace(tuple(specs), shape, start, end, True, False, config, 0, None))
    model, variables = stage.model, stage.variables
    out_shape = networks.layer_shapes(specs, shape)[end]
    rng = np.random.default_rng(0)
    x = tf.constant(rng.standard_normal((args.microbatch, *shape)).astype(np.float32))
    upstream = tf.constant(rng.standard_normal((args.microbatch, *out_shape)).astype(np.float32))

    keys = tf.zeros([args.microbatch] if stage.drops else [0], tf.int64)

    @tf.function
    def one_function(x, upstream):
        with tf.GradientTape() as tape:
            out = channels_first(model(channels_last(x), training=True))
        return tape.gradient(out, variables, output_gradients=upstream)

    def stage_ms(keep):
        return 1e3 * stage.microbatch_seconds(keep, args.microbatch, args.repeats, pick=statistics.median)

    def call_ms(call):
        return 1e3 * metrics.median_call_seconds(call, args.repeats, 0.0)

    figures = {"model": args.model, "image": args.image, "microbatch": args.microbatch,
               "stage_layers": [start, end], "ms": {
                   "forward": call_ms(lambda: stage._forward(x, keys)),
                   "recompute": stage_ms(False), "kept": stage_ms(True),
                   "one_function": call_ms(lambda: one_function(x, upstream))}}
    print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
