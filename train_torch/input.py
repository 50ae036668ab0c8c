"""The PyTorch end of the input path (common/data/batches.py): batches reach the device as bytes.

The prefetch thread reads each batch's uint8 pixels straight into page-locked
host memory and copies them to the GPU on a side CUDA stream, one batch ahead of
the step that trains on it; the step's stream waits for that copy's event (the
host does not), then the device mirrors and normalises the pixels. The same
arithmetic on a CPU device gives exactly ``common.data.batches.reference_inputs``.

--decode gpu (``JpegDecoder``): the prefetch thread reads the files' bytes, the
GPU decodes them (nvJPEG through torchvision, batched) and resamples each crop
the way Pillow does on the CPU path (common/data/jpeg.py's coefficients, two passes,
rounded to bytes in between).
"""

from __future__ import annotations

import contextlib
from dataclasses import replace

import numpy as np
import torch

from common.core.config import Amp, Mode
from common.core.errors import launcher_rank
from common.core.metrics import IGNORED_LABEL, log
from common.data import jpeg
from common.data.batches import Batch, Normalisation


class TorchSums:
    """A step's (loss sum, correct) as a float64 tensor on the device and its sample count,
    read later as (loss sum, correct, count)."""

    def __init__(self, sums: torch.Tensor, count: int):
        self.sums, self.count = sums, count

    def resolve(self) -> np.ndarray:
        return np.append(self.sums.cpu().numpy(), float(self.count))


class DeviceMeter:
    """(loss sum, correct, count) kept on a GPU: adding a chunk's results does not wait for
    it (nothing crosses to the host: a tensor made from a host number would be a blocking
    copy). On a CPU there is nothing to wait for, and the sums are read at once."""

    def __init__(self, device):
        self.on_gpu, self.count = device.type == "cuda", 0
        self.sums = torch.zeros(2, dtype=torch.float64, device=device) if self.on_gpu else np.zeros(3)

    def add(self, loss_sum: torch.Tensor, correct: torch.Tensor, count: int) -> None:
        if not self.on_gpu:
            self.sums += (loss_sum.item(), correct.item(), count)
            return
        self.sums += torch.stack([loss_sum.detach().double(), correct.double()])
        self.count += count

    def pending(self):
        return TorchSums(self.sums, self.count) if self.on_gpu else self.sums


class _HostSlot:
    """A page-locked buffer and the event of the last copy out of it."""

    def __init__(self, shape: tuple, dtype):
        self.tensor = torch.empty(shape, dtype=dtype, pin_memory=True)
        self.copied: torch.cuda.Event | None = None


class TorchFeed:
    """common.data.batches.Feed for one device: where batches are read into, their copy to the
    device, and the model inputs made of them there."""

    RING = 4  # page-locked buffers in turn: the batch training, the one copying, the one reading, one spare

    def __init__(self, device: torch.device, normalisation: Normalisation, memory_format=torch.contiguous_format,
                 decoder: JpegDecoder | None = None):
        self.device, self.memory_format, self.decoder = device, memory_format, decoder
        self.cuda = self.on_gpu = device.type == "cuda"
        scale, shift = normalisation.arrays()
        self.scale, self.shift = torch.from_numpy(scale).to(device), torch.from_numpy(shift).to(device)
        self.side = torch.cuda.Stream(device) if self.cuda else None
        self.slots: list[_HostSlot | None] = [None] * self.RING
        self.turn = 0
        self.by_address: dict = {}

    # --- in the prefetch thread ---------------------------------------------------

    def host_buffer(self, shape: tuple, dtype) -> np.ndarray:
        if not self.cuda:
            return np.empty(shape, dtype=dtype)
        self.turn = (self.turn + 1) % self.RING
        slot = self.slots[self.turn]
        torch_dtype = torch.from_numpy(np.empty(0, dtype=dtype)).dtype
        if slot is not None and slot.copied is not None:
            slot.copied.synchronize()  # its last batch has left for the device: it may be overwritten
        if slot is None or tuple(slot.tensor.shape) != tuple(shape) or slot.tensor.dtype != torch_dtype:
            slot = self.slots[self.turn] = _HostSlot(shape, torch_dtype)
        array = slot.tensor.numpy()
        self.by_address[array.ctypes.data] = slot
        return array

    def stage(self, batch: Batch) -> Batch:
        """Start the batch's way to the device; the step's stream waits for it in ``arrive``."""
        with self._on_side_stream():
            labels = self._small(batch.labels)
            pixels: torch.Tensor | None
            flips: torch.Tensor | None
            if batch.encoded is not None:
                assert self.decoder is not None, "encoded images reach only a feed with a decoder (--decode gpu)"
                pixels, flips = self.decoder.decode(batch.encoded)
            else:
                pixels, flips = self._pixels(batch.pixels), self._small(batch.flips)
            arrived = None
            if self.cuda:
                arrived = torch.cuda.Event()
                arrived.record(self.side)
                slot = self.by_address.pop(batch.pixels.ctypes.data, None) if batch.pixels is not None else None
                if slot is not None:
                    slot.copied = arrived
        return replace(batch, labels=labels, pixels=pixels, flips=flips, encoded=None, staged=arrived)

    def _on_side_stream(self):
        if not self.cuda:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        stack.enter_context(torch.cuda.device(self.device))
        stack.enter_context(torch.cuda.stream(self.side))
        return stack

    def _pixels(self, array: np.ndarray | None) -> torch.Tensor | None:
        if array is None:
            return None
        slot = self.by_address.get(array.ctypes.data) if self.cuda else None
        host = slot.tensor if slot is not None else torch.from_numpy(array)
        return host.to(self.device, non_blocking=True) if self.cuda else host

    def _small(self, array: np.ndarray | None) -> torch.Tensor | None:
        if array is None:
            return None
        host = torch.from_numpy(np.ascontiguousarray(array))
        return host.pin_memory().to(self.device, non_blocking=True) if self.cuda else host

    # --- in the training thread ----------------------------------------------------

    def arrive(self, batch: Batch) -> Batch:
        """The step's stream waits (on the device) for the batch's copy, and the tensors the
        side stream made are marked as used by the step's stream (so their memory is not
        reused under it)."""
        if batch.staged is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(batch.staged)
            for tensor in (batch.pixels, batch.labels, batch.flips):
                if tensor is not None:
                    tensor.record_stream(stream)
        return replace(batch, staged=None)

    def inputs(self, batch: Batch) -> torch.Tensor:
        """The float32 model inputs: pixels mirrored where drawn, then * scale - shift
        (two operations, as common.data.batches.normalise computes them)."""
        x = batch.pixels.to(torch.float32)
        if batch.flips is not None and len(batch.flips):
            x = torch.where(batch.flips.view(-1, 1, 1, 1), x.flip(-1), x)
        x = torch.sub(torch.mul(x, self.scale), self.shift)
        return x.contiguous(memory_format=self.memory_format)

    def labels(self, batch: Batch) -> torch.Tensor:
        """The batch's labels on the device, blank samples' (--skip-bad-images) IGNORED_LABEL."""
        if batch.blank is None:
            return batch.labels
        return batch.labels.masked_fill(torch.from_numpy(batch.blank).to(batch.labels.device), IGNORED_LABEL)


class JpegDecoder:
    """--decode gpu: a batch of files' bytes -> uint8 (N, C, size, size) pixels on the device.

    torchvision.io.decode_jpeg, one batched call: nvJPEG on a GPU, libjpeg-turbo on a CPU;
    where torchvision's image library does not load (beside a CPU-only PyTorch build),
    Pillow decodes the whole image on the host and the device does the rest. Each crop
    is resized with Pillow's coefficients (common/data/jpeg.py) as two batched matrix
    products, rounded to bytes after each as Pillow rounds."""

    CHUNK = 32  # images resampled together (their decoded sizes are padded to the largest)

    def __init__(self, device: torch.device, channels: int, size: int):
        self.device, self.channels, self.size = device, channels, size
        self.torchvision = torchvision_decoder(device)

    def describe(self) -> str:
        if self.torchvision:
            decoder = "nvJPEG" if self.device.type == "cuda" else "libjpeg-turbo, on the CPU"
            return f"torchvision.io.decode_jpeg ({decoder}) on {self.device}"
        return (f"Pillow on the host (torchvision's decoder does not load here), crops resampled by PyTorch on "
                f"{self.device}")

    def decode(self, samples: list) -> tuple[torch.Tensor, torch.Tensor]:
        out = torch.empty((len(samples), self.channels, self.size, self.size), dtype=torch.uint8, device=self.device)
        flips = torch.tensor([sample.flip for sample in samples], dtype=torch.bool)
        encoded = [i for i, sample in enumerate(samples) if isinstance(sample, jpeg.EncodedImage)]
        for i, sample in enumerate(samples):
            if isinstance(sample, jpeg.HostDecoded):
                out[i] = torch.tensor(sample.pixels).to(self.device)
        decoded = self._decode_all([samples[i] for i in encoded])
        for start in range(0, len(encoded), self.CHUNK):
            chosen = encoded[start:start + self.CHUNK]
            out[chosen] = self.resample(decoded[start:start + self.CHUNK], [samples[i].box for i in chosen])
        return out, flips.to(self.device, non_blocking=True)

    def _decode_all(self, samples: list) -> list:
        if not samples:
            return []
        if self.torchvision:
            decode_jpeg, mode = self.torchvision
            data = [torch.from_numpy(sample.data) for sample in samples]
            read_mode = mode.GRAY if self.channels == 1 else mode.RGB
            try:
                return decode_jpeg(data, mode=read_mode, device=self.device)
            except RuntimeError:  # one file torchvision refuses: the others by it, that one by Pillow
                return [self._decode_one(decode_jpeg, one, read_mode, sample) for one, sample in zip(data, samples)]
        return [torch.from_numpy(self._pillow_decode(sample.data)).to(self.device) for sample in samples]

    def _decode_one(self, decode_jpeg, data, read_mode, sample):
        try:
            return decode_jpeg(data, mode=read_mode, device=self.device)
        except RuntimeError:
            return torch.from_numpy(self._pillow_decode(sample.data)).to(self.device)

    def _pillow_decode(self, data: np.ndarray) -> np.ndarray:
        import io

        from PIL import Image

        with Image.open(io.BytesIO(data.tobytes())) as image:
            pixels = np.asarray(image.convert("L" if self.channels == 1 else "RGB"), dtype=np.uint8)
        return np.ascontiguousarray(pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1))

    def resample(self, images: list, boxes: list) -> torch.Tensor:
        """Each (C, H, W) uint8 image's crop box resized to size x size, Pillow's way."""
        height = max(int(image.shape[1]) for image in images)
        width = max(int(image.shape[2]) for image in images)
        padded = torch.zeros((len(images), self.channels, height, width), dtype=torch.float32, device=self.device)
        across = np.zeros((len(images), width, self.size), dtype=np.float32)
        down = np.zeros((len(images), self.size, height), dtype=np.float32)
        for i, (image, (left, top, box_width, box_height)) in enumerate(zip(images, boxes)):
            padded[i, :, :image.shape[1], :image.shape[2]] = image
            across[i, :image.shape[2]] = jpeg.resample_weights(int(image.shape[2]), left, left + box_width,
                                                              self.size).T
            down[i, :, :image.shape[1]] = jpeg.resample_weights(int(image.shape[1]), top, top + box_height,
                                                               self.size)
        across_t = torch.from_numpy(across).to(self.device, non_blocking=True)
        down_t = torch.from_numpy(down).to(self.device, non_blocking=True)
        rows = _to_bytes(torch.matmul(padded, across_t.unsqueeze(1)))     # (N, C, H, size)
        return _to_bytes(torch.matmul(down_t.unsqueeze(1), rows)).to(torch.uint8)  # (N, C, size, size)


def torchvision_decoder(device: torch.device):
    """torchvision's decode_jpeg and its read modes, if they decode on ``device`` here (its
    image library does not load beside a CPU-only PyTorch build)."""
    import io

    from PIL import Image

    try:
        from torchvision.io import ImageReadMode, decode_jpeg
        probe = io.BytesIO()
        Image.new("RGB", (8, 8), (90, 20, 200)).save(probe, "JPEG")
        decode_jpeg(torch.frombuffer(bytearray(probe.getvalue()), dtype=torch.uint8), device=device)
        return decode_jpeg, ImageReadMode
    except Exception:  # noqa: BLE001 - any failure to load or decode: Pillow decodes instead
        return None


def _to_bytes(values: torch.Tensor) -> torch.Tensor:
    """Pillow's rounding of a pass to 8 bits (kept as float for the next product)."""
    return torch.clamp(torch.floor(values + 0.5), 0, 255)


def memory_format(config, device: torch.device):
    """--channels-last, by default on exactly where it pays: mixed precision on a GPU."""
    wanted = config.channels_last if config.channels_last is not None else (config.amp != Amp.OFF and
                                                                            device.type == "cuda")
    return torch.channels_last if wanted else torch.contiguous_format


def make_feed(config, device: torch.device, dataset, reads) -> TorchFeed:
    """The rank's feed: its device, the dataset's normalisation, and --decode gpu's decoder
    when this rank reads images."""
    decoder = make_decoder(config, device, dataset) if reads.images else None
    return TorchFeed(device, dataset.normalisation, memory_format(config, device), decoder)


def make_decoder(config, device, dataset) -> JpegDecoder | None:
    """--decode gpu's decoder (None for --decode cpu), with one line on how it decodes."""
    if config.decode != "gpu" or not dataset.encoded_reader("train"):
        return None
    decoder = JpegDecoder(device, dataset.image_shape[0], dataset.image_shape[1])
    if launcher_rank() == (1 if config.mode == Mode.PS else 0):  # the first rank that reads images says it once
        log(f"--decode gpu: JPEGs decoded by {decoder.describe()}")
    return decoder
