"""One image: decoded, cropped, resized and flipped as torchvision's recipes do, with
every random choice drawn from (seed, epoch, sample index); the pixel normalisation."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from common.data import batches
from common.data.batches import Normalisation

GRAYSCALE_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")
# ImageNet's statistics (the standard recipe; grayscale images take their mean).
RGB_MEAN, RGB_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
GRAY_MEAN, GRAY_STD = (0.449,), (0.226,)
EVAL_RESIZE_RATIO = 0.875  # resize to size / 0.875 (256 for 224), then centre-crop size


def random_resized_crop_box(rng: np.random.Generator, width: int, height: int,
                            scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop draw: (left, top, width, height) of a crop covering
    ``scale`` of the area with aspect ratio in ``ratio``; a centre crop after 10 misses."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        crop_width = int(round(math.sqrt(target_area * aspect)))
        crop_height = int(round(math.sqrt(target_area / aspect)))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            top = int(rng.integers(0, height - crop_height + 1))
            left = int(rng.integers(0, width - crop_width + 1))
            return left, top, crop_width, crop_height
    in_ratio = width / height
    if in_ratio < ratio[0]:
        crop_width, crop_height = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        crop_width, crop_height = int(round(height * ratio[1])), height
    else:
        crop_width, crop_height = width, height
    return (width - crop_width) // 2, (height - crop_height) // 2, crop_width, crop_height


def centre_crop_box(width: int, height: int, size: int) -> tuple[float, float, float, float]:
    """The box (in source pixels) that resizing the shorter side to size / 0.875 and
    centre-cropping ``size`` keeps: one resample, as torchvision's Resize + CenterCrop
    would produce up to rounding."""
    side = min(width, height) * EVAL_RESIZE_RATIO
    return (width - side) / 2, (height - side) / 2, side, side


@dataclass(frozen=True)
class ImageTransform:
    """How one file becomes one uint8 (channels, size, size) sample."""
    size: int
    channels: int
    augment: bool  # training draw: random-resized crop + horizontal flip; else resize + centre crop
    seed: int = 0

    def load(self, path: str, index: int, epoch: int) -> np.ndarray:
        """The sample as the model sees it: ``read``'s pixels, mirrored when drawn so."""
        pixels, flip = self.read(path, index, epoch)
        return pixels[..., ::-1] if flip else pixels

    def read(self, path: str, index: int, epoch: int) -> tuple[np.ndarray, bool]:
        """(uint8 (C, size, size) pixels of this sample's crop, whether to mirror them): the
        mirroring is left to whoever normalises the batch (the device, or normalise())."""
        from PIL import Image

        mode = "L" if self.channels == 1 else "RGB"
        with Image.open(path) as opened:
            image: Image.Image = opened
            left, top, width, height, flip = self.crop(*image.size, index, epoch)
            box = (left, top, left + width, top + height)
            if image.format == "JPEG":
                box = self._draft(image, mode, box)
            # Gray to RGB only copies a channel: cheaper after the resize.
            if image.mode != mode and not (image.mode == "L" and mode == "RGB"):
                image = image.convert(mode)
            image = image.resize((self.size, self.size), Image.Resampling.BILINEAR, box=box)
        if image.mode != mode:  # convert() copies even when the mode is already right
            image = image.convert(mode)
        pixels = np.asarray(image, dtype=np.uint8)
        return (pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)), flip

    def crop(self, width: int, height: int, index: int, epoch: int) -> tuple:
        """(left, top, width, height, flip) of this sample's view of a width x height image."""
        if not self.augment:
            return (*centre_crop_box(width, height, self.size), False)
        rng = np.random.default_rng([self.seed, epoch, index])
        return (*random_resized_crop_box(rng, width, height), bool(rng.random() < 0.5))

    def _draft(self, image, mode: str, box: tuple) -> tuple:
        """Let libjpeg decode at 1/2, 1/4 or 1/8 scale when the crop keeps at least ``size``
        pixels a side (far less work for large photos and small crops); the crop box in the
        smaller image's pixels."""
        full_width, full_height = image.size
        scale = max(1e-9, min((box[2] - box[0]) / self.size, (box[3] - box[1]) / self.size))
        image.draft(mode, (math.ceil(full_width / scale), math.ceil(full_height / scale)))
        x_scale, y_scale = image.size[0] / full_width, image.size[1] / full_height
        return box[0] * x_scale, box[1] * y_scale, box[2] * x_scale, box[3] * y_scale


def pixel_normalisation(channels: int) -> Normalisation:
    """ImageNet's statistics (grayscale: their mean) as the scale and shift of uint8 pixels."""
    mean, std = (GRAY_MEAN, GRAY_STD) if channels == 1 else (RGB_MEAN, RGB_STD)
    return Normalisation.from_mean_std(mean, std)


def normalise(batch: np.ndarray, channels: int, out: np.ndarray | None = None) -> np.ndarray:
    """uint8 (N, C, H, W) -> float32 scaled to [0, 1], minus the mean, over the std per
    channel; written into ``out`` when given (one pass, no temporaries)."""
    return batches.normalise(batch, pixel_normalisation(channels), out)
