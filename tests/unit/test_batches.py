"""The input path: batches read as bytes, read ahead, and made into model inputs on the
device exactly as the host computes them (common/data/batches.py, train_*/input.py)."""

import threading

import numpy as np
import pytest

from common.core.config import RunConfig
from common.data import batches, datasets, decoders, folders, transforms
from common.data.batches import Batch, BatchReader, Prefetcher, Reads

BOTH = Reads(images=True, labels=True)


class HostFeed:
    """A feed whose tensors are the numpy arrays themselves: the host's side alone."""

    on_gpu = False

    def host_buffer(self, shape, dtype):
        return np.empty(shape, dtype=dtype)

    def stage(self, batch):
        return batch


def synthetic(shape="3,12,10"):
    return datasets.load_dataset(RunConfig(dataset="synthetic", synthetic_shape=shape, synthetic_samples=40))


def folder_set(tree, augment=True):
    index = folders.scan_folder(tree, 0.25)
    transform = transforms.ImageTransform(16, 3, augment, seed=3)
    return decoders.StreamedImages(index.train.paths, transform, None), index.train.labels


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("tree")
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (root / name).mkdir()
        for i in range(6):
            pixels = rng.integers(0, 256, (int(rng.integers(20, 40)), int(rng.integers(20, 40)), 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return str(root)


def test_normalisation_is_the_imagenet_recipe_as_one_multiply_and_one_subtract():
    pixels = np.arange(256, dtype=np.uint8).reshape(1, 1, 16, 16).repeat(3, axis=1)
    out = transforms.normalise(pixels, 3)
    for channel, (mean, std) in enumerate(zip(transforms.RGB_MEAN, transforms.RGB_STD)):
        scale, shift = np.float32(1 / (255 * std)), np.float32(mean / std)
        assert np.array_equal(out[0, channel], pixels[0, channel] * scale - shift)


def test_datasets_hold_bytes_and_read_the_inputs_they_always_gave():
    digits = datasets.load_digits()
    assert digits.x_train.pixel_dtype == np.uint8
    from sklearn.datasets import load_digits
    levels = load_digits().images.astype(np.float32)
    assert np.array_equal(np.sort(np.unique(digits.x_train[:])), np.sort(np.unique(levels / 16.0 - 0.5)))
    noise = synthetic().x_train[:]
    assert abs(noise.mean()) < 0.05 and abs(noise.std() - 1) < 0.05  # unit-variance inputs from bytes


def test_batch_parts_cut_as_array_split_does():
    batch = Batch(np.arange(10), labels=np.arange(10) * 2, pixels=np.arange(10) * 3, flips=np.arange(10) % 2 == 0)
    for count in (1, 3, 4, 10, 12):
        parts = batch.parts(count)
        assert [list(part.indices) for part in parts] == [list(piece) for piece in np.array_split(np.arange(10), count)]
        assert all(np.array_equal(part.pixels, part.indices * 3) and np.array_equal(part.labels, part.indices * 2)
                   for part in parts)


@pytest.mark.parametrize("reads", [Reads(True, True), Reads(False, True), Reads(True, False), Reads(False, False)])
def test_a_rank_reads_only_what_it_needs(reads):
    dataset = synthetic()
    batch = BatchReader(dataset.x_train, dataset.y_train, reads, HostFeed()).read(np.array([3, 1, 4]))
    assert (batch.pixels is not None) == reads.images and (batch.labels is not None) == reads.labels
    if reads.images:
        assert batch.pixels.dtype == np.uint8
        assert np.array_equal(batches.reference_inputs(batch, dataset.normalisation), dataset.x_train[[3, 1, 4]])


def test_streamed_images_read_as_bytes_with_their_flips_give_the_same_inputs(tree):
    stream, labels = folder_set(tree)
    order = np.random.default_rng(1).permutation(len(labels))
    stream.plan(order, epoch=2)
    out = np.empty((len(order), 3, 16, 16), dtype=np.uint8)
    flips = stream.read_into(order, out)
    assert 0 < flips.sum() < len(flips)  # both kinds drawn, so the flip is really tested
    expected = stream[order]  # off the plan now: decoded again, the CPU path's float inputs
    got = batches.reference_inputs(Batch(order, pixels=out, flips=flips), stream.normalisation)
    assert np.array_equal(got, expected)
    stream.close()


def torch_inputs(batch, normalisation, memory_format=None):
    torch = pytest.importorskip("torch")
    from train_torch.input import TorchFeed

    feed = TorchFeed(torch.device("cpu"), normalisation, memory_format or torch.contiguous_format)
    staged = feed.arrive(feed.stage(batch))
    return feed.inputs(staged), feed.labels(staged)


def tf_inputs(batch, normalisation):
    pytest.importorskip("tensorflow")
    from train_tf.input import TfFeed

    feed = TfFeed("cpu", normalisation)
    staged = feed.arrive(feed.stage(batch))
    return feed.inputs(staged).numpy().transpose(0, 3, 1, 2), feed.labels(staged).numpy()


@pytest.mark.parametrize("framework", ["torch", "tf"])
def test_the_device_path_gives_the_host_inputs_bit_for_bit(tree, framework):
    """Same indices and seed: the uint8 pixels, mirrored and normalised by the framework,
    equal the float32 batch the CPU path computes (digits, synthetic, an augmented folder)."""
    stream, labels = folder_set(tree)
    stream.plan(np.arange(len(labels)), epoch=1)
    cases = [(datasets.load_digits(), np.array([5, 0, 9, 2])), (synthetic(), np.array([7, 3, 3, 0, 11]))]
    for dataset, indices in cases:
        read = BatchReader(dataset.x_train, dataset.y_train, BOTH, HostFeed()).read(indices)
        expected = dataset.x_train[indices]
        got, got_labels = (torch_inputs if framework == "torch" else tf_inputs)(read, dataset.normalisation)
        assert np.array_equal(np.asarray(got), expected) and np.array_equal(np.asarray(got_labels),
                                                                            dataset.y_train[indices])
    indices = np.arange(len(labels))
    read = BatchReader(stream, labels, BOTH, HostFeed()).read(indices)
    assert read.flips.any()
    got, _ = (torch_inputs if framework == "torch" else tf_inputs)(read, stream.normalisation)
    assert np.array_equal(np.asarray(got), stream[indices])
    stream.close()


def test_channels_last_inputs_hold_the_same_values():
    torch = pytest.importorskip("torch")
    dataset = synthetic()
    read = BatchReader(dataset.x_train, dataset.y_train, BOTH, HostFeed()).read(np.arange(6))
    got, _ = torch_inputs(read, dataset.normalisation, torch.channels_last)
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert np.array_equal(got.numpy(), dataset.x_train[np.arange(6)])


def test_channels_last_is_on_by_default_with_amp_on_a_gpu_only():
    torch = pytest.importorskip("torch")
    from train_torch.input import memory_format

    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert memory_format(RunConfig(amp="bf16"), cuda) == torch.channels_last
    assert memory_format(RunConfig(amp="off"), cuda) == torch.contiguous_format
    assert memory_format(RunConfig(amp="bf16"), cpu) == torch.contiguous_format
    assert memory_format(RunConfig(amp="bf16", channels_last=False), cuda) == torch.contiguous_format
    assert memory_format(RunConfig(channels_last=True), cpu) == torch.channels_last


def test_the_prefetcher_keeps_order():
    steps = [np.array([i, i + 1]) for i in range(0, 12, 2)]
    prefetch = Prefetcher(lambda indices: Batch(indices), lambda batch: batch, steps, depth=2)
    assert [list(batch.indices) for batch in prefetch] == [list(step) for step in steps]
    prefetch.close()


def test_the_prefetcher_reads_no_further_than_depth_ahead():
    reads, far_enough = [], threading.Event()

    def read(indices):
        reads.append(int(indices[0]))
        if len(reads) == 3:
            far_enough.set()  # two queued and one on its way: as far as depth 2 may go
        return Batch(indices)
    prefetch = Prefetcher(read, lambda batch: batch, [np.array([i]) for i in range(6)], depth=2)
    assert far_enough.wait(timeout=30)
    prefetch.close()  # nothing was taken: the thread is held at its third batch
    assert reads == [0, 1, 2]


def test_the_prefetcher_hands_a_reading_failure_to_the_step_that_needed_it():
    def read(indices):
        if indices[0] == 2:
            raise ValueError("unreadable image 2")
        return Batch(indices)
    prefetch = Prefetcher(read, lambda batch: batch, [np.array([i]) for i in range(5)], depth=1)
    assert [int(prefetch.next().indices[0]) for _ in range(2)] == [0, 1]
    with pytest.raises(ValueError, match="unreadable image 2"):
        prefetch.next()
    prefetch.close()


def test_closing_the_prefetcher_early_stops_its_thread():
    prefetch = Prefetcher(lambda indices: Batch(indices), lambda batch: batch,
                          [np.array([i]) for i in range(1000)], depth=1)
    prefetch.next()
    prefetch.close()
    assert not prefetch._thread.is_alive()

