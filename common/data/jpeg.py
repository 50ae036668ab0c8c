"""--decode gpu, its framework-neutral half: the files as bytes, with each sample's crop.

The host reads each JPEG's bytes and its header (size, components), draws the
sample's crop and flip exactly as the CPU path does (common/data/decoders.py:
ImageTransform.crop, from (seed, epoch, index)), and leaves decoding and
resampling to the device (train_torch/input.py). Files that are not baseline or
progressive 8-bit JPEGs with one or three components (PNG, CMYK, 12-bit) are
decoded on the host, as the CPU path decodes them.

``resample_weights`` is Pillow's bilinear resampling (the CPU path's
``Image.resize(..., BILINEAR, box=...)``) as a matrix: the same taps, the same
22-bit fixed-point coefficients, so a device that applies it in two passes with
Pillow's rounding reproduces Pillow's pixels up to float rounding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# Start-of-frame markers of the JPEG processes nvJPEG decodes: baseline, extended
# sequential, progressive (Huffman). Lossless and arithmetic-coded frames are not.
DECODABLE_FRAMES = (0xC0, 0xC1, 0xC2)
OTHER_FRAMES = (0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF)
PRECISION_BITS = 32 - 8 - 2  # Pillow's fixed point for 8-bit images (Resample.c)


@dataclass(frozen=True)
class JpegHeader:
    width: int
    height: int
    components: int
    precision: int
    frame: int


def jpeg_header(data: bytes) -> JpegHeader | None:
    """The frame header of a JPEG file's bytes, or None when they are not a JPEG."""
    if len(data) < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return None
    position = 2
    while position + 4 <= len(data):
        if data[position] != 0xFF:
            return None
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # markers without a length
            position += 2
            continue
        length = int.from_bytes(data[position + 2:position + 4], "big")
        if marker in DECODABLE_FRAMES or marker in OTHER_FRAMES:
            if position + 10 > len(data):
                return None
            frame = data[position + 4:position + 10]
            return JpegHeader(width=int.from_bytes(frame[3:5], "big"), height=int.from_bytes(frame[1:3], "big"),
                              components=frame[5], precision=frame[0], frame=marker)
        if marker == 0xDA or length < 2:  # scan data before any frame header: not a JPEG we know
            return None
        position += 2 + length
    return None


def device_decodable(header: JpegHeader | None) -> bool:
    return (header is not None and header.frame in DECODABLE_FRAMES and header.precision == 8
            and header.components in (1, 3) and header.width > 0 and header.height > 0)


@dataclass(frozen=True)
class EncodedImage:
    """One sample for the device to decode: the file's bytes, the crop (left, top, width,
    height, in the full image's pixels) and whether to mirror the result."""
    data: np.ndarray  # uint8, the whole file
    width: int
    height: int
    box: tuple
    flip: bool


@dataclass(frozen=True)
class HostDecoded:
    """A sample the host decoded (a file the device cannot): pixels as the CPU path makes them."""
    pixels: np.ndarray  # uint8 (C, size, size), unmirrored
    flip: bool


def encoded_sample(path: str, transform, index: int, epoch: int) -> EncodedImage | HostDecoded:
    """``transform``'s sample ``index`` of ``path`` in ``epoch``, left for the device when it can
    decode the file. A file that cannot be read at all raises (as the CPU path does)."""
    with open(path, "rb") as handle:
        data = handle.read()
    header = jpeg_header(data)
    if header is None or not device_decodable(header):
        pixels, flip = transform.read(path, index, epoch)
        return HostDecoded(pixels, flip)
    left, top, width, height, flip = transform.crop(header.width, header.height, index, epoch)
    return EncodedImage(np.frombuffer(bytearray(data), dtype=np.uint8), header.width, header.height,
                        (left, top, width, height), flip)


def resample_band(in_size: int, start: float, stop: float, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pillow's bilinear resampling (triangle filter, antialiased when shrinking) of source
    pixels start..stop onto out_size pixels, as (first source pixel of each output, its
    (out_size, taps) coefficients), quantised to Pillow's fixed point (Resample.c:
    precompute_coeffs, normalize_coeffs_8bpc). Taps past an output's window weigh 0."""
    scale = (stop - start) / out_size
    filter_scale = max(scale, 1.0)
    support = 1.0 * filter_scale  # the bilinear filter's support is 1
    taps = int(np.ceil(support)) * 2 + 1
    centre = start + (np.arange(out_size) + 0.5) * scale
    low = np.maximum(0, (centre - support + 0.5).astype(np.int64))
    high = np.minimum(in_size, (centre + support + 0.5).astype(np.int64))
    offsets = np.arange(taps)
    position = low[:, None] + offsets[None, :]
    values = np.maximum(0.0, 1.0 - np.abs((position - centre[:, None] + 0.5) / filter_scale))
    values = np.where(offsets[None, :] < (high - low)[:, None], values, 0.0)
    totals = values.sum(axis=1, keepdims=True)
    values = np.divide(values, totals, out=np.zeros_like(values), where=totals != 0)
    fixed = np.where(values < 0, np.trunc(-0.5 + values * (1 << PRECISION_BITS)),
                     np.trunc(0.5 + values * (1 << PRECISION_BITS)))
    return low, (fixed / (1 << PRECISION_BITS)).astype(np.float32)


def resample_weights(in_size: int, start: float, stop: float, out_size: int) -> np.ndarray:
    """The same as a dense (out_size, in_size) float32 matrix."""
    low, band = resample_band(in_size, start, stop, out_size)
    dense = np.zeros((out_size, in_size + band.shape[1]), dtype=np.float32)
    np.put_along_axis(dense, low[:, None] + np.arange(band.shape[1])[None, :], band, axis=1)
    return dense[:, :in_size]


def count_decodable(paths: Sequence[str], sample: int = 64) -> tuple[int, int]:
    """(how many of up to ``sample`` evenly spread files the device can decode, how many looked at)."""
    if not paths:
        return 0, 0
    picks = sorted({int(i) for i in np.linspace(0, len(paths) - 1, num=min(sample, len(paths)))})
    decodable = 0
    for i in picks:
        with open(paths[i], "rb") as handle:
            decodable += device_decodable(jpeg_header(handle.read(1 << 16)))
    return decodable, len(picks)


def pillow_resample(pixels: np.ndarray, box: tuple, size: int) -> np.ndarray:
    """(C, H, W) uint8 pixels' crop ``box`` (left, top, width, height) resized to size x size
    in numpy, in two passes (horizontal, then vertical, each rounded to uint8 as Pillow
    rounds): what the device computes, and what the tests hold it and Pillow against."""
    left, top, width, height = box
    horizontal = resample_weights(pixels.shape[2], left, left + width, size)
    vertical = resample_weights(pixels.shape[1], top, top + height, size)

    def rounded(values):
        return np.clip(np.floor(values + 0.5), 0, 255).astype(np.uint8)
    across = rounded(pixels.astype(np.float32) @ horizontal.T)
    return rounded(np.einsum("oh,chw->cow", vertical, across.astype(np.float32)))
