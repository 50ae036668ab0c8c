"""Train a CNN with PyTorch: data, model (pipeline) or hybrid parallel (see README.md).

    python train_torch/main.py                                  # one process
    horovodrun -np 2 python train_torch/main.py                 # data parallel, two ranks
    mpirun -np 2 python train_torch/main.py --mode model --pp 2 --microbatches 4
    mpirun -np 4 python train_torch/main.py --mode hybrid --pp 2 --dp 2
    mpirun -np 3 python train_torch/main.py --mode ps         # parameter server + 2 workers
    horovodrun -np 3 --min-np 2 --max-np 4 --host-discovery-script common/launch/discover_hosts.sh \
        python train_torch/main.py --elastic                    # workers may leave and join
"""

import os
import sys
from importlib import import_module

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common.core import trainer  # noqa: E402
from common.launch.entry import run_training  # noqa: E402
from common.launch.supervision import Supervision  # noqa: E402
from common.parallel import drivers  # noqa: E402


def main(argv: list[str] | None, supervision: Supervision) -> None:
    loaded = drivers.choose_layout(trainer.load_run(argv, "train_torch/main.py"),
                                   lambda: import_module("train_torch.stage").TorchStage)
    runner = drivers.make_runner(loaded.config, loaded.dataset, loaded.specs,
                                 lambda: import_module("train_torch.data_parallel").DataParallelRunner,
                                 lambda: import_module("train_torch.stage").TorchStage)
    trainer.run(loaded, runner, supervision)


if __name__ == "__main__":
    run_training(main)
