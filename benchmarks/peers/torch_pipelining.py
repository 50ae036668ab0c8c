"""torch.distributed.pipelining (GPipe, 1F1B, interleaved 1F1B or, for zb, its zero-bubble
schedule with one piece per rank, ScheduleInterleavedZeroBubble's ZB1P) on a common/model/networks.py
network, cut where our --mode model cuts it (common/parallel/plan.partition, by FLOPs or, with
--balance time, by each layer's forward + backward timed on rank 0): the peer of our pipelines.

    torchrun --nproc_per_node 2 benchmarks/peers/torch_pipelining.py --schedule 1f1b --microbatches 4
"""

import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from common_bench import parse, report, synthetic_batch, timed_windows
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
)

from common.model import networks
from common.parallel import plan
from train_torch.model import build_stage
from train_torch.stage import TorchStage

CHUNKS = 2  # interleaved: pieces per rank, as our --virtual-stages default


def main():
    args = parse({"--schedule": {"default": "1f1b", "choices": ["gpipe", "1f1b", "interleaved", "zb"]},
                  "--microbatches": {"type": int, "default": 4},
                  "--balance": {"default": "flops", "choices": ["flops", "time"]}})
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo")
    rank, stages = dist.get_rank(), dist.get_world_size()
    costs = [[cost.flops for cost in networks.layer_costs(args.specs, args.image_shape)]]
    if args.balance == "time":  # as our --balance time: timed once on one rank, shared
        if rank == 0:
            costs = [[forward + backward for forward, backward in TorchStage.measure_layer_times(
                args.specs, args.image_shape, args.batch_size // args.microbatches)]]
        dist.broadcast_object_list(costs, src=0)
    chunks = CHUNKS if args.schedule == "interleaved" else 1
    ranges = plan.partition(costs[0], stages, "", chunks, args.microbatches)
    pieces = [build_stage(args.specs, args.image_shape, 0, *ranges[chunk * stages + rank]) for chunk in range(chunks)]
    pipeline_stages = [PipelineStage(piece, chunk * stages + rank, stages * chunks, torch.device("cpu"))
                       for chunk, piece in enumerate(pieces)]
    # Summed losses divided by the global batch: the same loss our pipelines use.
    loss = lambda out, y: F.cross_entropy(out, y, reduction="sum") / args.batch_size  # noqa: E731
    if chunks > 1:
        schedule = ScheduleInterleaved1F1B(pipeline_stages, args.microbatches, loss_fn=loss)
    elif args.schedule == "zb":
        schedule = ScheduleInterleavedZeroBubble(pipeline_stages, args.microbatches, loss_fn=loss)
    else:
        schedule = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[args.schedule](pipeline_stages[0], args.microbatches,
                                                                                  loss_fn=loss)
    module = torch.nn.ModuleList(pieces)
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
