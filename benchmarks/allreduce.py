"""Allreduce bandwidth: Horovod (the library our data mode uses) vs raw mpi4py
``Allreduce`` on the same ranks, float32 sums from 1 KB to 64 MB.

    mpirun -np 2 python benchmarks/allreduce.py

Prints ``BENCH_RESULT {json}`` on rank 0: per size, the median seconds of the
repetitions after one warm-up and the algorithm bandwidth (bytes / second).
"""

import json
import os
import statistics
import sys
import time

from mpi4py import MPI

SIZES = [1 << shift for shift in range(10, 27, 2)]  # 1 KB, 4 KB, ..., 64 MB


def repetitions(size, smallest=200):
    return max(3, min(smallest, (16 << 20) // size))


def median_seconds(operation, repeats, comm):
    operation()  # warm-up (Horovod negotiates a new tensor name once)
    times = []
    for _ in range(repeats):
        comm.Barrier()
        start = time.perf_counter()
        operation()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    import horovod.torch as hvd
    import numpy as np
    import torch

    comm = MPI.COMM_WORLD
    hvd.init(comm=comm)
    quick = "--quick" in sys.argv
    results = []
    for size in SIZES[:3] if quick else SIZES:
        count = size // 4
        array, out = np.ones(count, dtype=np.float32), np.empty(count, dtype=np.float32)
        tensor = torch.ones(count)
        repeats = 3 if quick else repetitions(size)
        mpi = median_seconds(lambda array=array, out=out: comm.Allreduce(array, out, op=MPI.SUM), repeats, comm)
        def horovod_call(tensor=tensor, name=f"bench{size}"):
            return hvd.allreduce(tensor, op=hvd.Sum, name=name)
        horovod = median_seconds(horovod_call, repeats, comm)
        results.append({"bytes": size, "mpi4py_seconds": mpi, "horovod_seconds": horovod,
                        "mpi4py_bytes_per_sec": size / mpi, "horovod_bytes_per_sec": size / horovod})
    if comm.rank == 0:
        print("BENCH_RESULT " + json.dumps({"world_size": comm.size, "sizes": results,
                                            "yield_when_idle": os.environ.get("OMPI_MCA_mpi_yield_when_idle")}),
              flush=True)


if __name__ == "__main__":
    main()
