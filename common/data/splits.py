"""A fixed, stratified train/test split with numpy alone.

It draws exactly what scikit-learn's ``train_test_split(..., stratify=labels,
random_state=seed)`` draws (a unit test holds the two equal), so the digits split
stays the one every earlier run used, without importing scikit-learn: its import
costs about a second in every process of a job.
"""

from __future__ import annotations

import math

import numpy as np


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, test indices): each class split in the data's proportion, both shuffled."""
    n_test = math.ceil(test_fraction * len(labels))
    n_train = len(labels) - n_test
    classes, class_of, class_counts = np.unique(labels, return_inverse=True, return_counts=True)
    members = np.split(np.argsort(class_of, kind="stable"), np.cumsum(class_counts)[:-1])
    rng = np.random.RandomState(seed)
    train_counts = _apportion(class_counts, n_train, rng)
    test_counts = _apportion(class_counts - train_counts, n_test, rng)
    train: list[int] = []
    test: list[int] = []
    for index in range(len(classes)):
        shuffled = members[index].take(rng.permutation(class_counts[index]), mode="clip")
        train.extend(shuffled[:train_counts[index]])
        test.extend(shuffled[train_counts[index]:train_counts[index] + test_counts[index]])
    return rng.permutation(train), rng.permutation(test)


def _apportion(class_counts: np.ndarray, draws: int, rng: np.random.RandomState) -> np.ndarray:
    """``draws`` shared out over the classes in proportion to their counts: each gets the floor
    of its share, and the remaining draws go to the largest remainders, ties broken by ``rng``."""
    share = class_counts / class_counts.sum() * draws
    counts = np.floor(share)
    left = int(draws - counts.sum())
    remainder = share - counts
    for value in np.sort(np.unique(remainder))[::-1]:
        if left <= 0:
            break
        (tied,) = np.where(remainder == value)
        chosen = rng.choice(tied, size=min(len(tied), left), replace=False)
        counts[chosen] += 1
        left -= len(chosen)
    return counts.astype(int)
