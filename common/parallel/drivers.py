"""The runner --mode asks for: Horovod data parallel (the framework's), the pipeline
(model and hybrid), or the parameter server; and, --mode auto, the layout to ask for."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from common.core.config import Mode, RunConfig
from common.core.runner import Runner, StageFactory
from common.data import datasets
from common.parallel import memory_model
from common.parallel.plan import check_stages

if TYPE_CHECKING:
    from common.core.trainer import LoadedRun


def choose_layout(loaded: LoadedRun, stage_factory: Callable[[], StageFactory]) -> LoadedRun:
    """--mode auto: the run with the layout the planner chose (common/parallel/auto.py), and
    its record; --plan-only ends here, the table printed. Other modes: the run as it is."""
    if loaded.config.mode != Mode.AUTO:
        return loaded
    from common.parallel import auto

    resolved = auto.resolve(loaded.config, loaded.specs, loaded.dataset.image_shape, stage_factory())
    if loaded.config.plan_only:
        auto.write_plan(loaded.config, resolved)
        raise SystemExit(0)
    check_stages(resolved.config, loaded.specs)
    held = memory_model.HeldBeyondTensors(resolved.profile.baseline, resolved.profile.allocator)
    return replace(loaded, config=resolved.config, layout_choice=auto.record(resolved), profiled_memory=held)


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
