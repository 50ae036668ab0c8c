"""Train a CNN with PyTorch: data, model (pipeline) or hybrid parallel (see README.md).

    python train_torch/main.py                                  # one process
    horovodrun -np 2 python train_torch/main.py                 # data parallel, two ranks
    mpirun -np 2 python train_torch/main.py --mode model --pp 2 --microbatches 4
    mpirun -np 4 python train_torch/main.py --mode hybrid --pp 2 --dp 2
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import data, models, plan, training  # noqa: E402
from common.config import parse_config  # noqa: E402
from common.launch import run_entry  # noqa: E402


def main(argv=None):
    config = parse_config(argv, prog="train_torch/main.py")
    dataset = data.load_dataset(config)
    specs = models.model_specs(config.model, dataset.image_shape, dataset.num_classes)
    plan.check_stages(config, specs)
    if config.mode == "data":  # heavy imports only once the input is valid
        from train_torch.data_parallel import DataParallelRunner as Runner
    else:
        from train_torch.pipeline import TorchPipelineRunner as Runner
    training.run(config, dataset, specs, Runner(config, dataset, specs))


if __name__ == "__main__":
    run_entry(main)
