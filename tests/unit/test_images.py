"""Image folders without MPI: the scan, the augmentation draws, the stream, the checks."""

import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from common.core.config import parse_config
from common.core.errors import RankUsageError, UsageError
from common.data import datasets, decoders, elpv, folders, image_checks, transforms
from common.launch.cpu_budget import cpus_per_rank

SIZE = 12


def write_image(path, seed, size=(20, 14), mode="RGB"):
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)


def make_tree(root, counts, mode="RGB", extension=".png"):
    for label, (name, count) in enumerate(counts.items()):
        for i in range(count):
            write_image(os.path.join(root, name, f"img{i:03d}{extension}"), seed=100 * label + i, mode=mode)
    return str(root)


@pytest.fixture
def tree(tmp_path):
    return make_tree(tmp_path / "tree", {"cat": 7, "dog": 5, "ant": 4})


# --- the scan ---------------------------------------------------------------------

def test_one_tree_is_split_per_class_with_a_fixed_draw_and_sorted_classes(tree):
    index = folders.scan_folder(tree, 0.25)
    assert index.classes == ("ant", "cat", "dog") and index.layout == "split"
    for label, name in enumerate(index.classes):
        train = {p for p, y in zip(index.train.paths, index.train.labels) if y == label}
        val = {p for p, y in zip(index.val.paths, index.val.labels) if y == label}
        assert train and val and not train & val  # every class on both sides, no file twice
        assert all(os.path.basename(os.path.dirname(p)) == name for p in train | val)
        assert len(train | val) == len(os.listdir(os.path.join(tree, name)))
    assert folders.scan_folder(tree, 0.25).val.paths == index.val.paths  # the same files held out every time


def test_train_val_layout_gives_the_same_labels_and_takes_any_extension_case(tmp_path):
    root = tmp_path / "tv"
    make_tree(root / "train", {"b": 3, "a": 2}, extension=".JPG")
    make_tree(root / "val", {"a": 1, "b": 1}, extension=".Png")
    (root / "train" / "a" / "notes.txt").write_text("not an image, not listed")
    index = folders.scan_folder(str(root), 0.2)
    assert index.layout == "train/val" and index.classes == ("a", "b")
    assert list(index.train.labels) == [0, 0, 1, 1, 1] and list(index.val.labels) == [0, 1]
    assert all(path.endswith(".JPG") for path in index.train.paths)


@pytest.mark.parametrize("layout,pattern", [
    ("missing", "not found"),
    ("empty", "has no class folders"),
    ("one-class", "one class folder"),
    ("empty-class", "holds no images"),
    ("different-classes", "hold different classes"),
    ("train-without-val", "no val/"),
])
def test_bad_layouts_are_named(tmp_path, layout, pattern):
    root = tmp_path / "d"
    if layout != "missing":
        root.mkdir()
    if layout == "one-class":
        make_tree(root, {"only": 2})
    if layout == "empty-class":
        make_tree(root, {"a": 2})
        (root / "b").mkdir()
    if layout == "different-classes":
        make_tree(root / "train", {"a": 2, "b": 2})
        make_tree(root / "val", {"a": 1, "c": 1})
    if layout == "train-without-val":
        make_tree(root / "train", {"a": 2, "b": 2})
    with pytest.raises(UsageError, match=pattern):
        folders.scan_folder(str(root), 0.2)


# --- one sample -------------------------------------------------------------------------

def test_random_resized_crop_boxes_stay_inside_and_cover_the_scale_range():
    rng = np.random.default_rng(0)
    areas = []
    for _ in range(500):
        left, top, width, height = transforms.random_resized_crop_box(rng, 300, 200)
        assert 0 <= left and 0 <= top and left + width <= 300 and top + height <= 200
        areas.append(width * height / (300 * 200))
    assert min(areas) < 0.15 and max(areas) > 0.8  # at most 0.89: a 4:3 crop of a 3:2 image
    # An image far outside the aspect range falls back to the centre crop torchvision takes.
    assert transforms.random_resized_crop_box(np.random.default_rng(0), 1000, 10) == (493, 0, 13, 10)


def test_a_samples_augmentation_depends_on_seed_epoch_and_index_only(tree):
    path = folders.scan_folder(tree, 0.25).train.paths[0]
    transform = transforms.ImageTransform(SIZE, 3, augment=True, seed=5)
    sample = transform.load(path, 3, epoch=1)
    assert sample.shape == (3, SIZE, SIZE) and sample.dtype == np.uint8
    assert np.array_equal(sample, transform.load(path, 3, epoch=1))
    draws = [transform.load(path, 3, epoch) for epoch in range(2, 8)] + [transform.load(path, 4, 1)]
    assert all(not np.array_equal(sample, other) for other in draws)
    flips = [np.array_equal(transforms.ImageTransform(SIZE, 3, False).load(path, 0, 0)[..., ::-1], d) for d in draws]
    assert not any(flips)  # crops differ as well as flips


def test_evaluation_resizes_and_centre_crops_and_converts_channels(tmp_path):
    path = str(tmp_path / "wide.png")
    pixels = np.zeros((40, 80, 3), dtype=np.uint8)
    pixels[:, :20] = 255  # a white band on the left, cropped away by the centre crop
    Image.fromarray(pixels).save(path)
    rgb = transforms.ImageTransform(16, 3, augment=False).load(path, 0, 0)
    gray = transforms.ImageTransform(16, 1, augment=False).load(path, 0, 0)
    assert rgb.shape == (3, 16, 16) and gray.shape == (1, 16, 16)
    assert rgb.max() == 0 and gray.max() == 0


def test_normalise_uses_the_channel_statistics():
    batch = np.full((2, 3, 4, 4), 255, dtype=np.uint8)
    out = transforms.normalise(batch, 3)
    expected = [(1 - m) / s for m, s in zip(transforms.RGB_MEAN, transforms.RGB_STD)]
    assert out.dtype == np.float32
    assert np.allclose(out[0, :, 0, 0], expected, atol=1e-6)


# --- the stream -------------------------------------------------------------------------

def streamed(tree, workers, augment=True):
    index = folders.scan_folder(tree, 0.25)
    return decoders.StreamedImages(index.train.paths, transforms.ImageTransform(SIZE, 3, augment, seed=1),
                                 decoders.start_workers(workers))


def test_batches_are_the_same_bytes_with_any_workers_chunking_or_plan(tree):
    inline, pooled = streamed(tree, 0), streamed(tree, 2)
    order = datasets.epoch_permutation(len(inline), seed=0, epoch=3)
    try:
        inline.plan(np.arange(0), epoch=2)
        reference = np.concatenate([inline[[i]] for i in order])  # off the plan, one at a time
        inline.plan(order, epoch=2)
        pooled.plan(order, epoch=2, lookahead=5)
        chunks = [order[:3], order[3:4], order[4:]]
        planned_inline = np.concatenate([inline[chunk] for chunk in chunks])
        planned_pooled = np.concatenate([pooled[chunk] for chunk in chunks])
        assert np.array_equal(planned_inline, reference)
        assert np.array_equal(planned_pooled, reference)
        assert pooled[order[:2]].shape == (2, 3, SIZE, SIZE)  # after the plan is used up: on demand
        pooled.plan(order, epoch=3)
        assert not np.array_equal(pooled[order], reference)  # another epoch, other draws
    finally:
        inline.close()
        pooled.close()


def test_prefetch_is_bounded_by_the_lookahead_not_the_dataset(tmp_path):
    stream = streamed(make_tree(tmp_path / "big", {"a": 30, "b": 30}), 1)
    order = np.arange(len(stream))
    try:
        stream.plan(order, epoch=0, lookahead=2)
        assert stream.lookahead == 2 * decoders.SAMPLES_PER_TASK  # two blocks per worker at least
        for start in range(0, 20, 4):
            stream[order[start:start + 4]]
            in_flight = stream.submitted - stream.consumed
            assert 0 < in_flight <= stream.lookahead + decoders.SAMPLES_PER_TASK
            assert len(stream.blocks.every) <= stream.lookahead // decoders.SAMPLES_PER_TASK + 2
        assert stream.submitted < len(order)  # not the whole epoch at once
    finally:
        stream.close()


def test_a_rank_that_never_reads_decodes_nothing(tree):
    stream = streamed(tree, 1)
    stream.plan(np.arange(len(stream)), epoch=0)
    assert stream.submitted == 0
    stream.close()


# --- bad files ---------------------------------------------------------------------------

def png_claiming(width, height):
    """A PNG header for an image of width x height and no pixels: a decompression bomb's shape."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IEND", b""))


@pytest.mark.parametrize("case,header_finds_it", [
    ("not-an-image", True), ("truncated", False), ("dangling-link", True), ("decompression-bomb", True)])
def test_bad_files_are_named_before_training(tree, case, header_finds_it):
    bad = os.path.join(tree, "cat", "bad.png")
    if case == "not-an-image":
        with open(bad, "w") as handle:
            handle.write("<html>an error page saved as .png</html>")
    if case == "truncated":
        good = open(os.path.join(tree, "cat", "img000.png"), "rb").read()
        open(bad, "wb").write(good[:len(good) // 2])
    if case == "dangling-link":
        os.symlink(os.path.join(tree, "gone.png"), bad)
    if case == "decompression-bomb":
        open(bad, "wb").write(png_claiming(40000, 40000))
    paths = folders.scan_folder(tree, 0.25)
    every = list(paths.train.paths + paths.val.paths)
    assert bad in every
    with pytest.raises(RankUsageError, match=f"{bad} is not a readable image"):
        image_checks.check_images(every, True, None)
    if header_finds_it:
        with pytest.raises(RankUsageError, match="bad.png"):
            image_checks.check_images(every, False, None)
    else:
        assert len(image_checks.check_images(every, False, None)) == len(every)


def test_an_image_that_breaks_after_the_scan_stops_or_is_skipped(tree):
    index = folders.scan_folder(tree, 0.25)
    path = index.train.paths[2]
    open(path, "wb").write(b"gone bad")
    transform = transforms.ImageTransform(SIZE, 3, True)
    with pytest.raises(RankUsageError, match=path):
        decoders.StreamedImages(index.train.paths, transform, None)[[0, 1, 2]]
    lines = []
    skipping = decoders.StreamedImages(index.train.paths, transform, None, skip_bad=True, log=lines.append)
    batch = skipping[[0, 1, 2]]
    assert skipping.skipped == 1 and path in lines[0]
    assert list(skipping.blanked(np.array([2, 0, 1]))) == [True, False, False]
    assert skipping.blanked(np.array([0, 1])) is None
    assert np.allclose(batch[2], transforms.normalise(np.zeros((1, 3, SIZE, SIZE), np.uint8), 3)[0])


# --- the dataset as the trainer sees it -----------------------------------------------------

def test_a_folder_dataset_loads_with_channels_from_the_images(tmp_path):
    root = make_tree(tmp_path / "gray", {"x": 4, "y": 4}, mode="L")
    config = parse_config(["--dataset", "folder", "--data-dir", root, "--image-size", "10", "--data-workers", "0"])
    dataset = datasets.load_dataset(config)
    try:
        assert dataset.image_shape == (1, 10, 10) and dataset.num_classes == 2 and dataset.streamed
        assert len(dataset.y_train) + len(dataset.y_test) == 8
        assert dataset.x_test[np.arange(len(dataset.y_test))].shape == (len(dataset.y_test), 1, 10, 10)
    finally:
        dataset.close()
    config = parse_config(["--dataset", "folder", "--data-dir", root, "--channels", "3", "--data-workers", "0"])
    assert datasets.load_dataset(config).image_shape == (3, 224, 224)


@pytest.mark.parametrize("args,pattern", [
    (["--val-fraction", "1.5"], "--val-fraction"), (["--channels", "2"], "--channels"),
    (["--image-size", "0"], "--image-size"), (["--data-workers", "-3"], "--data-workers")])
def test_folder_flags_are_checked(tree, args, pattern):
    with pytest.raises(UsageError, match=pattern):
        parse_config(["--dataset", "folder", "--data-dir", tree, *args])


def test_cpus_per_rank_shares_the_node_unless_the_launcher_bound_the_rank(monkeypatch):
    from common.launch import cpu_budget

    monkeypatch.setattr(cpu_budget, "cgroup_file", lambda *names: None)  # no cgroup: the node's 16 CPUs
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_SIZE", "4")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert cpus_per_rank() == 4
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {2, 3})
    assert cpus_per_rank() == 2


# --- the real images ------------------------------------------------------------------------

def test_elpv_tree_holds_real_labelled_cells(tmp_path):
    counts = elpv.write_tree(str(tmp_path / "elpv"), "binary", per_class=3)
    assert counts == {"defective": 3, "functional": 3}
    labels = {os.path.basename(p): q for p, q, _ in elpv.read_labels(elpv.package_data())}
    assert len(labels) == 2624
    for name in ("defective", "functional"):
        for file in os.listdir(tmp_path / "elpv" / name):
            probability = labels[file.split("_", 1)[1]]
            assert (probability >= 0.5) == (name == "defective")
            with Image.open(tmp_path / "elpv" / name / file) as image:
                assert image.size == (300, 300) and image.mode == "L"


def test_large_jpegs_decode_at_a_reduced_scale_to_nearly_the_same_sample(tmp_path):
    path = str(tmp_path / "photo.jpg")
    y, x = np.mgrid[0:800, 0:1200]
    smooth = np.stack([(x / 5) % 256, (y / 4) % 256, ((x + y) / 9) % 256], axis=-1).astype(np.uint8)
    Image.fromarray(smooth).save(path, quality=95)
    transform = transforms.ImageTransform(32, 3, augment=False)
    drafted = transform.load(path, 0, 0)
    left, top, width, height = transforms.centre_crop_box(1200, 800, 32)
    with Image.open(path) as image:  # the full decode, resized once, for comparison
        full = np.asarray(image.convert("RGB").resize((32, 32), Image.Resampling.BILINEAR,
                                                      box=(left, top, left + width, top + height)))
    assert np.array_equal(drafted, transform.load(path, 0, 0))
    assert not np.array_equal(drafted.transpose(1, 2, 0), full)  # decoded at 1/8 scale, not in full
    assert np.abs(drafted.transpose(1, 2, 0).astype(int) - full).mean() < 6
