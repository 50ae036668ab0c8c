"""Checking image files before training: each one opens (or decodes, --check-images
full), decompression bombs refused, one clear line naming the first bad file."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Executor

from common.core.errors import RankUsageError
from common.data.folders import FolderIndex
from common.data.transforms import GRAYSCALE_MODES


@contextlib.contextmanager
def decompression_bombs_refused() -> Iterator[None]:
    """Pillow warns from 89 M pixels on and refuses twice that: refuse from the warning on."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        yield


def describe_problem(error: BaseException) -> str:
    text = getattr(error, "strerror", None) or str(error) or type(error).__name__
    return f"{type(error).__name__}: {text}"


def check_image(path: str, full: bool) -> tuple[str | None, str]:
    """(problem or None, mode) of one file: its header (and with ``full`` its pixels) must decode."""
    from PIL import Image

    try:
        with decompression_bombs_refused():
            with Image.open(path) as image:
                mode = image.mode
                if full:
                    image.load()
        return None, mode
    except Exception as error:  # noqa: BLE001 - every failure names the file
        return describe_problem(error), ""


def bad_image_message(path: str, problem: str) -> str:
    return (f"folder dataset: {path} is not a readable image ({problem}); replace or remove it "
            "(or pass --skip-bad-images to train on without it)")


def _check_task(paths: Sequence[str], full: bool) -> list:
    return [check_image(path, full) for path in paths]


def check_images(paths: Sequence[str], full: bool, pool: Executor | None) -> list:
    """Modes of the images ``paths``; RankUsageError naming the first file that fails."""
    chunks = [paths[start:start + 64] for start in range(0, len(paths), 64)]
    results: Iterable[list] = ([_check_task(chunk, full) for chunk in chunks] if pool is None
                               else pool.map(_check_task, chunks, [full] * len(chunks)))
    modes = []
    for chunk, outcomes in zip(chunks, results):
        for path, (problem, mode) in zip(chunk, outcomes):
            if problem:
                raise RankUsageError(bad_image_message(path, problem))
            modes.append(mode)
    return modes


def infer_channels(index: FolderIndex) -> int:
    """1 when the first image of every class is grayscale, else 3 (--channels overrides)."""
    first: dict[int, str] = {}
    for path, label in zip(index.train.paths, index.train.labels):
        first.setdefault(int(label), path)
    modes = check_images(list(first.values()), False, None)
    return 1 if all(mode in GRAYSCALE_MODES for mode in modes) else 3
