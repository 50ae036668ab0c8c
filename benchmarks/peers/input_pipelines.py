"""Input pipelines alone (no model): decode + random-resized crop + flip + normalise to
--size px, batches of 64, --workers decoders, over an image folder.

    python input_pipelines.py --impl ours|torchvision|tf --dir D --size 224 --workers 2

ours: common/data/decoders.py (spawned decoder processes, prefetch); torchvision:
datasets.ImageFolder + DataLoader(num_workers) with the same transforms; tf:
keras.utils.image_dataset_from_directory + tf.data map(num_parallel_calls) with
tf.image's equivalents. Prints BENCH_RESULT with images/sec per window and the
peak resident memory of the process and its decoders (MiB).
"""

import argparse
import os
import resource
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common_bench import REPO, report, torchvision_datasets_and_transforms  # noqa: E402

BATCH = 64


def ours(args):
    import numpy as np

    from common.data import datasets, decoders, folders, transforms

    index = folders.scan_folder(args.dir, 0.2)
    transform = transforms.ImageTransform(args.size, 3, augment=True, seed=0)
    stream = decoders.StreamedImages(index.train.paths, transform, decoders.start_workers(args.workers))
    order = datasets.epoch_permutation(len(stream), 0, 0)
    needed = BATCH * args.batches * args.windows
    order = np.resize(order, needed)  # a folder smaller than the run is read again
    stream.plan(order, 0, lookahead=2 * BATCH)
    batches = iter(order.reshape(-1, BATCH))
    try:
        yield from (stream[next(batches)] for _ in range(args.batches * args.windows))
    finally:
        stream.close()


def torchvision_loader(args):
    import torch

    datasets, transforms = torchvision_datasets_and_transforms()
    transform = transforms.Compose([
        transforms.RandomResizedCrop(args.size), transforms.RandomHorizontalFlip(), transforms.ToTensor(),
        transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    folder = datasets.ImageFolder(args.dir, transform)
    sampler = torch.utils.data.RandomSampler(folder, replacement=True,
                                             num_samples=BATCH * args.batches * args.windows)
    loader = torch.utils.data.DataLoader(folder, BATCH, sampler=sampler, num_workers=args.workers,
                                         persistent_workers=args.workers > 0,
                                         prefetch_factor=2 if args.workers else None)
    for images, _ in loader:
        yield images


def tf_dataset(args):
    import tensorflow as tf

    tf.config.threading.set_inter_op_parallelism_threads(max(1, args.workers))
    tf.config.threading.set_intra_op_parallelism_threads(max(1, args.workers))
    folder = tf.keras.utils.image_dataset_from_directory(args.dir, batch_size=None, image_size=(300, 300),
                                                         color_mode="rgb", shuffle=True, seed=0)
    mean, std = tf.constant([0.485, 0.456, 0.406]), tf.constant([0.229, 0.224, 0.225])

    def augment(image, label):
        begin, size, _ = tf.image.sample_distorted_bounding_box(
            tf.shape(image), tf.zeros([0, 0, 4]), area_range=(0.08, 1.0), aspect_ratio_range=(3 / 4, 4 / 3),
            max_attempts=10, use_image_if_no_bounding_boxes=True)
        crop = tf.image.resize(tf.slice(image, begin, size), (args.size, args.size))
        crop = tf.image.random_flip_left_right(crop)
        return (crop / 255.0 - mean) / std, label

    options = tf.data.Options()  # the decoding inside image_dataset_from_directory too: --workers threads
    options.threading.private_threadpool_size = max(1, args.workers)
    pipeline = (folder.repeat().map(augment, num_parallel_calls=max(1, args.workers))
                .batch(BATCH).prefetch(2).take(args.batches * args.windows).with_options(options))
    for images, _ in pipeline:
        yield images


def peak_mib():
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return (own + children) / 1024, own / 1024


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--impl", choices=("ours", "torchvision", "tf"), required=True)
    parser.add_argument("--dir", required=True)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--windows", type=int, default=4, help="the first is the warm-up")
    parser.add_argument("--batches", type=int, default=5, help="batches per timed window")
    args = parser.parse_args()
    sys.path.insert(0, REPO)
    batches = {"ours": ours, "torchvision": torchvision_loader, "tf": tf_dataset}[args.impl](args)
    rates = []
    for _ in range(args.windows):
        start = time.perf_counter()
        for _ in range(args.batches):
            next(batches)
        rates.append(args.batches * BATCH / (time.perf_counter() - start))
    batches.close()
    total, own = peak_mib()
    report(rates, peak_mib=own, peak_mib_with_decoders=total)


if __name__ == "__main__":
    main()
