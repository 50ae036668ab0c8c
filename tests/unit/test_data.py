import os
import pickle

import numpy as np
import pytest

from common.core.config import RunConfig
from common.core.errors import UsageError
from common.data import datasets, splits


def write_cifar_dir(directory, per_batch=6, protocol=2):
    """CIFAR-10's python batches, pickled as the real files are (protocol 2, numpy arrays)."""
    rng = np.random.default_rng(0)
    for name in (*datasets.CIFAR10_TRAIN_FILES, datasets.CIFAR10_TEST_FILE):
        batch = {b"data": rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8),
                 b"labels": rng.integers(0, 10, size=per_batch).tolist()}
        with open(os.path.join(directory, name), "wb") as handle:
            pickle.dump(batch, handle, protocol=protocol)


def test_digits_split_and_shapes():
    dataset = datasets.load_digits()
    assert dataset.image_shape == (1, 8, 8)
    assert len(dataset.y_train) + len(dataset.y_test) == 1797
    assert len(dataset.y_test) == 360
    assert dataset.x_train.dtype == np.float32 and dataset.y_train.dtype == np.int64
    assert dataset.x_train.pixel_dtype == np.uint8  # held as bytes, normalised when read
    inputs = dataset.x_train[:]
    assert inputs.dtype == np.float32 and -0.5 <= inputs.min() and inputs.max() <= 0.5
    assert set(np.unique(dataset.y_test)) == set(range(10))


def test_digits_are_scikit_learns_images_and_split_without_importing_it():
    """The loader reads scikit-learn's file itself: the same images, labels and split as
    load_digits + train_test_split(stratify=..., random_state=0), so every run keeps its data."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    reference = load_digits()
    pixels = reference.images.astype(np.uint8)[:, None]
    x_train, x_test, y_train, y_test = train_test_split(pixels, reference.target, test_size=0.2, random_state=0,
                                                        stratify=reference.target)
    ours = datasets.load_digits()
    assert np.array_equal(ours.x_train.pixels, x_train) and np.array_equal(ours.x_test.pixels, x_test)
    assert np.array_equal(ours.y_train, y_train) and np.array_equal(ours.y_test, y_test)


@pytest.mark.parametrize("seed", [0, 1, 7])
@pytest.mark.parametrize("counts,test_fraction", [((5, 2), 0.5), ((3, 3, 3, 2), 0.3), ((40, 7, 13, 13), 0.2),
                                                  ((2, 2, 2, 2, 2), 0.5)])  # ties in the remainders
def test_stratified_split_draws_what_scikit_learn_draws(counts, test_fraction, seed):
    from sklearn.model_selection import train_test_split
    labels = np.random.default_rng(seed).permutation(np.repeat(np.arange(len(counts)), counts))
    indices = np.arange(len(labels))
    train, test = splits.stratified_split(labels, test_fraction, seed)
    expected_train, expected_test = train_test_split(indices, test_size=test_fraction, random_state=seed,
                                                     stratify=labels)
    assert np.array_equal(train, expected_train) and np.array_equal(test, expected_test)


@pytest.mark.parametrize("protocol", [2, 5])  # the real files' protocol, and today's numpy pickles
def test_cifar10_loads_the_python_format(tmp_path, protocol):
    write_cifar_dir(tmp_path, protocol=protocol)
    dataset = datasets.load_cifar10(str(tmp_path))
    assert dataset.x_train.shape == (30, 3, 32, 32) and dataset.x_test.shape == (6, 3, 32, 32)
    with open(tmp_path / "data_batch_2", "rb") as handle:
        raw = pickle.load(handle, encoding="bytes")
    first = raw[b"data"][0].reshape(3, 32, 32) / 255.0
    expected = (first - datasets.CIFAR10_MEAN[0]) / datasets.CIFAR10_STD[0]
    np.testing.assert_allclose(dataset.x_train[6], expected, rtol=1e-5, atol=1e-5)
    assert dataset.y_train[6] == raw[b"labels"][0]


@pytest.mark.parametrize("content", [
    {b"data": np.array([1, "a"], dtype=object)},  # an object array holds arbitrary objects
    {b"data": len},                                # a builtin function
    {b"data": np.ma.masked_array([1, 2])},         # another array class
])
def test_cifar_unpickler_refuses_what_cifar_files_never_hold(tmp_path, content):
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps(content, protocol=2))
    with pytest.raises(datasets.CifarFileRefused):
        datasets.read_cifar_pickle(str(path))


def test_cifar10_missing_directory_says_where_to_get_it(tmp_path):
    with pytest.raises(UsageError, match="not found.*cifar-10-python.tar.gz"):
        datasets.load_cifar10(str(tmp_path / "absent"))


def test_cifar10_missing_file_is_named(tmp_path):
    write_cifar_dir(tmp_path)
    os.remove(tmp_path / "data_batch_3")
    with pytest.raises(UsageError, match="data_batch_3 is missing"):
        datasets.load_cifar10(str(tmp_path))


@pytest.mark.parametrize("content", [b"not a pickle", pickle.dumps({b"data": np.zeros((2, 5)), b"labels": [0, 1]})])
def test_cifar10_corrupt_file_is_named(tmp_path, content):
    write_cifar_dir(tmp_path)
    (tmp_path / "test_batch").write_bytes(content)
    with pytest.raises(UsageError, match="cannot read .*test_batch"):
        datasets.load_cifar10(str(tmp_path))


def test_synthetic_has_the_requested_shape():
    config = RunConfig(dataset="synthetic", synthetic_shape="3,16,12", synthetic_samples=40, num_classes=7)
    dataset = datasets.load_dataset(config)
    assert dataset.x_train.shape == (40, 3, 16, 12) and dataset.x_test.shape == (10, 3, 16, 12)
    assert dataset.y_train.max() < 7 and dataset.num_classes == 7
