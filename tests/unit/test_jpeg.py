"""--decode gpu: JPEG headers, Pillow's resampling as matrices, and the device's crops held
against the CPU path's (common/data/jpeg.py, train_torch/input.py's JpegDecoder, run on the CPU:
Pillow stands in for nvJPEG there; the device check runs nvJPEG itself)."""

import io

import numpy as np
import pytest
from PIL import Image

from common.data import decoders, folders, jpeg, transforms

torch = pytest.importorskip("torch")


def encoded(image, **options):
    buffer = io.BytesIO()
    image.save(buffer, **options)
    return buffer.getvalue()


def photo(width, height, seed=0):
    """A crop of one of scikit-learn's two bundled photographs, resized: real image statistics."""
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(seed)
    picture = load_sample_images().images[seed % 2]
    top, left = int(rng.integers(0, 100)), int(rng.integers(0, 200))
    return Image.fromarray(picture[top:top + 300, left:left + 400]).resize((width, height), Image.Resampling.BILINEAR)


def test_headers_say_what_the_device_can_decode():
    rgb = jpeg.jpeg_header(encoded(photo(64, 48), format="JPEG", quality=90))
    assert (rgb.width, rgb.height, rgb.components, rgb.precision) == (64, 48, 3, 8) and jpeg.device_decodable(rgb)
    gray = jpeg.jpeg_header(encoded(photo(30, 20).convert("L"), format="JPEG"))
    assert gray.components == 1 and jpeg.device_decodable(gray)
    progressive = jpeg.jpeg_header(encoded(photo(40, 40), format="JPEG", progressive=True))
    assert progressive.frame == 0xC2 and jpeg.device_decodable(progressive)
    cmyk = jpeg.jpeg_header(encoded(photo(40, 40).convert("CMYK"), format="JPEG"))
    assert cmyk.components == 4 and not jpeg.device_decodable(cmyk)
    assert jpeg.jpeg_header(encoded(photo(40, 40), format="PNG")) is None
    assert jpeg.jpeg_header(b"\xff\xd8\xff") is None  # cut short


def boxes(rng, width, height):
    for _ in range(12):
        box_width, box_height = int(rng.integers(4, width + 1)), int(rng.integers(4, height + 1))
        yield (int(rng.integers(0, width - box_width + 1)), int(rng.integers(0, height - box_height + 1)),
               box_width, box_height)
    yield transforms.centre_crop_box(width, height, 24)


def test_pillows_resampling_as_matrices_matches_pillow():
    rng = np.random.default_rng(0)
    for trial in range(4):
        width, height = int(rng.integers(30, 300)), int(rng.integers(30, 300))
        picture = np.asarray(photo(width, height, trial))
        for box in boxes(rng, width, height):
            size = int(rng.integers(8, 40))
            left, top, box_width, box_height = box
            expected = np.asarray(Image.fromarray(picture).resize(
                (size, size), Image.Resampling.BILINEAR, box=(left, top, left + box_width, top + box_height)))
            got = jpeg.pillow_resample(picture.transpose(2, 0, 1), box, size).transpose(1, 2, 0)
            # Pillow sometimes runs its two passes the other way round, which moves a
            # pixel by one level; a wrong tap or box moves it by far more.
            assert np.abs(got.astype(int) - expected).max() <= 1, (box, size)


def test_the_device_resamples_as_the_numpy_reference():
    from train_torch.input import JpegDecoder

    rng = np.random.default_rng(1)
    decoder = JpegDecoder(torch.device("cpu"), 3, 20)
    pictures = [np.asarray(photo(int(rng.integers(30, 120)), int(rng.integers(30, 120)), i)).transpose(2, 0, 1)
                for i in range(5)]
    chosen = [next(boxes(rng, p.shape[2], p.shape[1])) for p in pictures]
    got = decoder.resample([torch.from_numpy(np.ascontiguousarray(p)) for p in pictures], chosen).numpy()
    for picture, box, out in zip(pictures, chosen, got):
        difference = np.abs(out.astype(int) - jpeg.pillow_resample(picture, box, 20))
        assert difference.max() <= 1 and (difference == 0).mean() > 0.99


def photo_tree(root, per_class, width, height, step):
    """Two class folders of JPEG photos, ``width + step * i`` x ``height + step * i // 2`` each."""
    for label in ("a", "b"):
        (root / label).mkdir()
        for i in range(per_class):
            photo(width + step * i, height + step * i // 2, i + (label == "b")).save(root / label / f"{i}.jpg",
                                                                                    quality=90)
    return root


@pytest.fixture(scope="module")
def jpeg_tree(tmp_path_factory):
    root = photo_tree(tmp_path_factory.mktemp("jpegs"), 6, 160, 120, 16)
    photo(100, 80).save(root / "a" / "drawn.png")  # a file the device cannot decode
    return str(root)


def device_and_host_samples(tree, epoch, augment=True):
    from train_torch.input import JpegDecoder

    index = folders.scan_folder(tree, 0.25)
    paths = index.train.paths + index.val.paths
    stream = decoders.StreamedImages(paths, transforms.ImageTransform(48, 3, augment, seed=4), None)
    order = np.arange(len(paths))
    stream.plan(order, epoch)
    host = np.empty((len(order), 3, 48, 48), dtype=np.uint8)
    host_flips = stream.read_into(order, host)
    stream.plan(order, epoch)
    samples = stream.read_encoded(order)
    device, flips = JpegDecoder(torch.device("cpu"), 3, 48).decode(samples)
    stream.close()
    return host, host_flips, device.numpy(), flips.numpy(), samples


@pytest.mark.parametrize("augment", [True, False])
def test_device_crops_match_the_cpu_path_within_resampling_tolerance(jpeg_tree, augment):
    """The same (seed, epoch, index) draws: the same crop and flip. The CPU path decodes
    JPEGs at a reduced scale where the crop allows (libjpeg's DCT scaling), the device at
    full size, so pixels differ by a few levels, not by a different crop."""
    host, host_flips, device, flips, samples = device_and_host_samples(jpeg_tree, epoch=3, augment=augment)
    assert any(isinstance(sample, jpeg.HostDecoded) for sample in samples)  # the PNG stayed on the host
    assert sum(isinstance(sample, jpeg.EncodedImage) for sample in samples) >= 8
    assert np.array_equal(flips, host_flips) and (flips.any() or not augment)
    difference = np.abs(device.astype(int) - host.astype(int))
    assert difference.mean() < 3.0, difference.mean()
    if augment:
        other, _, _, _, _ = device_and_host_samples(jpeg_tree, epoch=4)
        assert np.abs(other.astype(int) - host.astype(int)).mean() > 3 * difference.mean() + 5
