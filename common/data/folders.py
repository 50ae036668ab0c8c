"""An image folder's file list: the layouts torchvision's ImageFolder and Keras'
image_dataset_from_directory read, class names sorted, a fixed stratified split where
the folder has none."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from common.core.errors import UsageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
SPLIT_NAMES = (("train", "val"), ("train", "test"))
SPLIT_SEED = 20240611  # the held-out files never change with --seed: a checkpoint is always judged on the same ones


@dataclass(frozen=True)
class Split:
    paths: tuple
    labels: np.ndarray  # int64, index into FolderIndex.classes


@dataclass(frozen=True)
class FolderIndex:
    root: str
    classes: tuple
    train: Split
    val: Split
    layout: str  # "train/val", "train/test" or "split"


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _class_files(directory: str) -> dict:
    """{class name: sorted image paths} of one class-folder tree; UsageError if it is not one."""
    try:
        entries = sorted(os.scandir(directory), key=lambda entry: entry.name)
    except OSError as error:
        raise UsageError(f"folder dataset: cannot read {directory} ({error.strerror}); check the path and "
                         "its permissions") from None
    classes = {}
    for entry in entries:
        if entry.is_dir() and not entry.name.startswith("."):
            files = []
            for root, folders, names in os.walk(entry.path, followlinks=True):
                folders.sort()
                files += [os.path.join(root, name) for name in sorted(names) if _is_image_name(name)]
            if not files:
                raise UsageError(f"folder dataset: class folder {entry.path} holds no images "
                                 f"({'/'.join(IMAGE_EXTENSIONS)}); add images or remove the folder")
            classes[entry.name] = files
    if not classes:
        raise UsageError(f"folder dataset: {directory} has no class folders; lay it out as DIR/<class>/*.jpg "
                         "or DIR/train/<class>/* with DIR/val/<class>/*")
    if len(classes) < 2:
        raise UsageError(f"folder dataset: {directory} has one class folder ({next(iter(classes))}); "
                         "a classifier needs at least two")
    return classes


def _as_split(classes: tuple, files: dict) -> Split:
    paths, labels = [], []
    for label, name in enumerate(classes):
        paths += files[name]
        labels += [label] * len(files[name])
    return Split(tuple(paths), np.asarray(labels, dtype=np.int64))


def stratified_split(files: dict, val_fraction: float) -> tuple[dict, dict]:
    """Per class, a fixed random ``val_fraction`` of its files (at least one, never all) held out."""
    rng = np.random.default_rng(SPLIT_SEED)
    train, val = {}, {}
    for name, paths in files.items():
        order = rng.permutation(len(paths))
        held = min(len(paths) - 1, max(1, round(val_fraction * len(paths)))) if len(paths) > 1 else 0
        val[name] = [paths[i] for i in sorted(order[:held])]
        train[name] = [paths[i] for i in sorted(order[held:])]
    return train, val


def scan_folder(root: str, val_fraction: float) -> FolderIndex:
    """The file list of an image folder in either layout (UsageError naming what is wrong)."""
    if not os.path.isdir(root):
        raise UsageError(f"folder dataset: directory {root} not found; pass an existing --data-dir")
    for train_name, val_name in SPLIT_NAMES:
        train_dir, val_dir = os.path.join(root, train_name), os.path.join(root, val_name)
        if os.path.isdir(train_dir) and os.path.isdir(val_dir):
            train, val = _class_files(train_dir), _class_files(val_dir)
            if set(train) != set(val):
                only_train, only_val = sorted(set(train) - set(val)), sorted(set(val) - set(train))
                raise UsageError(f"folder dataset: {train_dir} and {val_dir} hold different classes (only in "
                                 f"{train_name}: {', '.join(only_train) or '-'}; only in {val_name}: "
                                 f"{', '.join(only_val) or '-'}); give both the same class folders")
            classes = tuple(sorted(train))
            return FolderIndex(root, classes, _as_split(classes, train), _as_split(classes, val),
                               f"{train_name}/{val_name}")
    if os.path.isdir(os.path.join(root, "train")):
        raise UsageError(f"folder dataset: {root} has train/ but no val/ (or test/) beside it; add one, or "
                         "point --data-dir at the train folder to split it with --val-fraction")
    files = _class_files(root)
    classes = tuple(sorted(files))
    train, val = stratified_split(files, val_fraction)
    return FolderIndex(root, classes, _as_split(classes, train), _as_split(classes, val), "split")
