"""Train a CNN with TensorFlow: data, model (pipeline) or hybrid parallel (see README.md).

    python train_tf/main.py                                  # one process
    horovodrun -np 2 python train_tf/main.py                 # data parallel, two ranks
    mpirun -np 2 python train_tf/main.py --mode model --pp 2 --microbatches 4
    mpirun -np 4 python train_tf/main.py --mode hybrid --pp 2 --dp 2
    mpirun -np 3 python train_tf/main.py --mode ps         # parameter server + 2 workers

TensorFlow's start-up log lines are hidden; set TF_CPP_MIN_LOG_LEVEL=0 to see them.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common.core import trainer  # noqa: E402
from common.launch.entry import quiet_stderr, run_training  # noqa: E402
from common.launch.supervision import Supervision  # noqa: E402
from common.parallel import drivers  # noqa: E402


def main(argv: list[str] | None, supervision: Supervision) -> None:
    loaded = trainer.load_run(argv, "train_tf/main.py")
    verbose = os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3") != "3"
    with quiet_stderr(enabled=not verbose):  # TF logs to fd 2 before honouring the level
        from train_tf import data_parallel, stage  # heavy imports only once the input is valid
    loaded = drivers.choose_layout(loaded, lambda: stage.TfStage)
    runner = drivers.make_runner(loaded.config, loaded.dataset, loaded.specs, lambda: data_parallel.DataParallelRunner,
                                 lambda: stage.TfStage)
    trainer.run(loaded, runner, supervision)


if __name__ == "__main__":
    run_training(main)
