"""torch.distributed.pipelining (GPipe or 1F1B) on the seed CNN, cut where our
--mode model cuts it (common/plan.partition by FLOPs): the peer of our pipelines.

    torchrun --nproc_per_node 2 benchmarks/peers/torch_pipelining.py --schedule 1f1b --microbatches 4
"""

import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

from common_bench import parse, report, synthetic_batch, timed_windows

from common import models, plan
from train_torch.model import build_stage


def main():
    args = parse({"--schedule": {"default": "1f1b", "choices": ["gpipe", "1f1b"]},
                  "--microbatches": {"type": int, "default": 4}})
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo")
    rank, stages = dist.get_rank(), dist.get_world_size()
    costs = [cost[3] for cost in models.layer_costs(args.specs, args.image_shape)]
    start, end = plan.partition(costs, stages, "")[rank]
    module = build_stage(args.specs, args.image_shape, 0, start, end)
    stage = PipelineStage(module, rank, stages, torch.device("cpu"))
    schedule_class = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[args.schedule]
    # Summed losses divided by the global batch: the same loss our pipelines use.
    schedule = schedule_class(stage, args.microbatches,
                              loss_fn=lambda out, y: F.cross_entropy(out, y, reduction="sum") / args.batch_size)
    optimizer = torch.optim.SGD(module.parameters(), lr=args.lr, momentum=0.9)
    x, y = synthetic_batch(args.batch_size, args.image_shape)
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    first, last = rank == 0, rank == stages - 1

    def step():
        optimizer.zero_grad()
        if first:
            schedule.step(x)
        elif last:
            schedule.step(target=y)
        else:
            schedule.step()
        optimizer.step()

    rates = timed_windows(step, args.windows, args.steps, args.batch_size)
    if last:
        report(rates, world_size=stages, schedule=args.schedule, microbatches=args.microbatches)
    dist.barrier()  # no rank tears gloo down while another still reports (seen: SIGABRT at exit)
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
