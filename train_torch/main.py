"""Train a CNN with PyTorch: data parallel with Horovod (see README.md).

    python train_torch/main.py                      # one process
    horovodrun -np 2 python train_torch/main.py     # two ranks
    mpirun -np 2 python train_torch/main.py
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import data, models, training  # noqa: E402
from common.config import parse_config  # noqa: E402
from common.launch import run_entry  # noqa: E402


def main(argv=None):
    config = parse_config(argv, prog="train_torch/main.py")
    dataset = data.load_dataset(config)
    specs = models.model_specs(config.model, dataset.image_shape, dataset.num_classes)
    from train_torch.data_parallel import DataParallelRunner  # heavy imports once the input is valid

    training.run(config, dataset, specs, DataParallelRunner(config, dataset, specs))


if __name__ == "__main__":
    run_entry(main)
