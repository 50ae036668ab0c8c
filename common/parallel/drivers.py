"""The runner --mode asks for: Horovod data parallel (the framework's), the pipeline
(model and hybrid), or the parameter server."""

from __future__ import annotations

from collections.abc import Callable

from common.core.config import Mode, RunConfig
from common.core.runner import Runner, StageFactory
from common.data import datasets


def make_runner(config: RunConfig, dataset: datasets.Dataset, specs, data_parallel_runner: Callable[[], type],
                stage_factory: Callable[[], StageFactory]) -> Runner:
    """The runner --mode asks for. A framework passes functions that return its Horovod
    runner class and its stage class, so only the mode in use imports them (heavily)."""
    if config.mode == Mode.DATA:
        return data_parallel_runner()(config, dataset, specs)
    if config.mode == Mode.PS:
        from common.parallel.parameter_server import ParameterServerRunner
        return ParameterServerRunner(config, dataset, specs, stage_factory())
    from common.parallel.pipeline import PipelineRunner
    return PipelineRunner(config, dataset, specs, stage_factory())
