"""Launch an entry script on a Ray cluster, one Horovod worker per Ray actor.

    python -m common.launch.ray -np 2 train_torch/main.py --epochs 5
    python -m common.launch.ray -np 8 --address auto --cpus-per-worker 4 train_torch/main.py ...

Ray Train no longer runs Horovod (its HorovodTrainer was removed: ray PR #57857,
reasons in ray issue #49454); Horovod's own ``horovod.ray.RayExecutor`` still does,
over Gloo. This starts it, runs the entry script in every worker as `python SCRIPT
ARGS` would, and exits with the workers' worst exit status. Without ``--address`` it
starts a Ray instance on this machine with ``--num-cpus`` (default: the workers'
CPUs) and no dashboard. Ray's usage statistics are always off: nothing is sent
off the machine.
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys

from common import REPOSITORY


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m common.launch.ray", description=__doc__.split("\n\n")[0])
    parser.add_argument("-np", "--num-workers", type=int, required=True, help="Horovod workers (Ray actors)")
    parser.add_argument("--cpus-per-worker", type=int, default=1)
    parser.add_argument("--gpus", action="store_true", help="one GPU per worker")
    parser.add_argument("--address", default=None, help="a running Ray cluster ('auto', or HOST:PORT); "
                        "default: start one on this machine")
    parser.add_argument("--num-cpus", type=int, default=0, help="CPUs of the Ray instance started here "
                        "(default: workers x cpus-per-worker)")
    parser.add_argument("--timeout", type=int, default=120, help="seconds the workers have to start")
    parser.add_argument("script", help="train_torch/main.py or train_tf/main.py")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="the script's flags")
    options = parser.parse_args(argv)
    if options.num_workers < 1:
        parser.error("-np must be at least 1")
    if not os.path.isfile(options.script):
        parser.error(f"no script {options.script!r}; name an entry script, e.g. train_torch/main.py")
    return options


def run_script(script: str, args: list[str]) -> int:
    """In a Ray worker: run ``script`` as its own __main__, return its exit status."""
    sys.argv = [script, *args]
    if REPOSITORY not in sys.path:
        sys.path.insert(0, REPOSITORY)
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    return 0


def main(argv: list[str] | None = None) -> int:
    options = parse(sys.argv[1:] if argv is None else argv)
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"  # inherited by every Ray process started here
    try:
        import ray
        from horovod.ray import RayExecutor
    except ImportError as error:
        print(f"error: {error}; run `make install` (requirements.txt installs Ray)", file=sys.stderr)
        return 2
    cpus = options.num_cpus or options.num_workers * options.cpus_per_worker
    ray.init(address=options.address, include_dashboard=False,
             **({} if options.address else {"num_cpus": cpus}))
    executor = RayExecutor(RayExecutor.create_settings(timeout_s=options.timeout), num_workers=options.num_workers,
                           cpus_per_worker=options.cpus_per_worker, use_gpu=options.gpus,
                           gpus_per_worker=1 if options.gpus else None)
    try:
        executor.start()
        statuses = executor.run(run_script, args=[os.path.abspath(options.script), options.args])
    except ray.exceptions.RayActorError as error:  # a worker that ended its process (a rank's abort)
        print(f"error: a Ray worker ended: {error}", file=sys.stderr)
        return 1
    finally:
        executor.shutdown()
        ray.shutdown()
    return max(statuses)


if __name__ == "__main__":
    sys.exit(main())
