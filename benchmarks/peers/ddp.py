"""PyTorch DistributedDataParallel (gloo) on the seed CNN: the peer of our data mode.

    torchrun --nproc_per_node 2 benchmarks/peers/ddp.py --batch-size 128
"""

import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from common_bench import parse, report, synthetic_batch, timed_windows

from train_torch.model import build_model


def main():
    args = parse()
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = torch.nn.parallel.DistributedDataParallel(build_model(args.specs, args.image_shape, seed=0))
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    x, y = synthetic_batch(args.batch_size // world, args.image_shape, seed=rank)
    x, y = torch.from_numpy(x), torch.from_numpy(y)

    def step():
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()  # DDP averages the gradients during backward
        optimizer.step()

    rates = timed_windows(step, args.windows, args.steps, args.batch_size)
    if rank == 0:
        report(rates, world_size=world)
    dist.barrier()  # no rank tears gloo down while another still reports (seen: SIGABRT at exit)
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
