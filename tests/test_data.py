"""The loader on small IDX files: the good case and every way a file can be bad."""

from __future__ import annotations

import gzip
import hashlib

import numpy as np
import pytest
from conftest import idx_bytes, write_idx

from fmnist import data
from fmnist.config import CLASS_NAMES
from fmnist.data import DataError, IdxFile

from pictures import TEST_TROUSER, TEST_TROUSER_INDEX, trouser_article


def spec_for(payload: bytes, count: int, magic: int = data.IMAGES_MAGIC) -> IdxFile:
    return IdxFile("train-images-idx3-ubyte", magic, count, hashlib.sha256(payload).hexdigest())


@pytest.fixture
def images():
    return np.random.default_rng(1).integers(0, 256, size=(5, 28, 28), dtype=np.uint8)


@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_returns_the_images_and_checksum(tmp_path, images, compress):
    payload = idx_bytes(images, data.IMAGES_MAGIC)
    path = write_idx(tmp_path / "train-images-idx3-ubyte", payload, compress=compress)
    array, digest = data.read_idx(path, spec_for(payload, 5))
    np.testing.assert_array_equal(array, images)
    assert digest == hashlib.sha256(payload).hexdigest()


def test_missing_file_says_how_to_get_the_data(tmp_path, images):
    with pytest.raises(DataError, match=r"missing.*apt-get install dataset-fashion-mnist"):
        data.read_idx(tmp_path / "nope.gz", spec_for(b"", 5))


def test_truncated_gzip_is_reported(tmp_path, images):
    payload = idx_bytes(images, data.IMAGES_MAGIC)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(payload)[:-40])
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.gz.*truncated or corrupt"):
        data.read_idx(path, spec_for(payload, 5))


def test_truncated_content_is_reported(tmp_path, images):
    payload = idx_bytes(images, data.IMAGES_MAGIC)
    path = write_idx(tmp_path / "train-images-idx3-ubyte", payload[:-100])
    with pytest.raises(DataError, match=r"truncated: 3836 bytes where the header promises 3936"):
        data.read_idx(path, spec_for(payload, 5))


def test_shorter_than_header_is_reported(tmp_path):
    path = write_idx(tmp_path / "train-images-idx3-ubyte", b"\x00\x00")
    with pytest.raises(DataError, match="shorter than the 16-byte IDX header"):
        data.read_idx(path, spec_for(b"", 5))


def test_wrong_magic_number_is_reported(tmp_path, images):
    payload = idx_bytes(images, data.LABELS_MAGIC)
    path = write_idx(tmp_path / "train-images-idx3-ubyte", payload)
    with pytest.raises(DataError, match=r"wrong magic number 2049 \(an IDX images file starts with 2051\)"):
        data.read_idx(path, spec_for(payload, 5))


def test_wrong_count_is_reported(tmp_path, images):
    payload = idx_bytes(images, data.IMAGES_MAGIC)
    path = write_idx(tmp_path / "train-images-idx3-ubyte", payload)
    with pytest.raises(DataError, match=r"wrong count: the header says 5 items, train-images-idx3-ubyte has 60000"):
        data.read_idx(path, data.FILES["train_images"])


def test_checksum_mismatch_is_reported(tmp_path, images):
    payload = idx_bytes(images, data.IMAGES_MAGIC)
    altered = bytearray(payload)
    altered[-1] ^= 0xFF
    path = write_idx(tmp_path / "train-images-idx3-ubyte", bytes(altered))
    with pytest.raises(DataError, match=r"checksum mismatch.*fetch it again"):
        data.read_idx(path, spec_for(payload, 5))


def test_trailing_bytes_are_reported(tmp_path, images):
    payload = idx_bytes(images, data.IMAGES_MAGIC)
    path = write_idx(tmp_path / "train-images-idx3-ubyte", payload + b"\x00" * 10)
    with pytest.raises(DataError, match="has trailing bytes"):
        data.read_idx(path, spec_for(payload, 5))


def test_labels_out_of_range_are_reported(tmp_path):
    payload = idx_bytes(np.array([1, 2, 12], dtype=np.uint8), data.LABELS_MAGIC)
    path = write_idx(tmp_path / "train-labels-idx1-ubyte", payload)
    with pytest.raises(DataError, match="label 12 is outside 0-9"):
        data.read_idx(path, spec_for(payload, 3, magic=data.LABELS_MAGIC))


def test_load_scales_to_unit_float32_with_a_channel(small_dataset, monkeypatch):
    directory, arrays = small_dataset
    monkeypatch.setenv("FMNIST_DATA_DIR", str(directory))
    dataset = data.load_fashion_mnist()
    assert dataset.x_train.shape == (50, 28, 28, 1) and dataset.x_train.dtype == np.float32
    assert dataset.x_train.min() >= 0.0 and dataset.x_train.max() <= 1.0
    np.testing.assert_allclose(dataset.x_test[..., 0] * 255, arrays["test_images"], atol=1e-4)
    np.testing.assert_array_equal(dataset.y_train, arrays["train_labels"])
    assert dataset.source.startswith("FMNIST_DATA_DIR")
    assert set(dataset.checksums) == {spec.name for spec in data.FILES.values()}


def test_load_without_test_set_never_reads_it(small_dataset):
    directory, _ = small_dataset
    for path in directory.glob("t10k-*"):
        path.unlink()
    dataset = data.load_fashion_mnist(directory, include_test=False)
    assert dataset.x_test is None and dataset.y_test is None and len(dataset.y_train) == 50


def test_incomplete_data_dir_names_the_missing_file(small_dataset, monkeypatch):
    directory, _ = small_dataset
    (directory / "t10k-labels-idx1-ubyte.gz").unlink()
    monkeypatch.setenv("FMNIST_DATA_DIR", str(directory))
    with pytest.raises(DataError, match=r"FMNIST_DATA_DIR=.*file is missing: t10k-labels-idx1-ubyte"):
        data.load_fashion_mnist()


def test_nothing_found_offline_lists_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.delenv("FMNIST_DATA_DIR", raising=False)
    monkeypatch.setattr(data, "DEBIAN_DATA_DIR", tmp_path / "debian")
    monkeypatch.setattr(data, "KERAS_CACHE_DIR", tmp_path / "keras")
    with pytest.raises(DataError, match=r"not found; looked in: .*debian.*keras.*apt-get install"):
        data.locate_data_dir(allow_download=False)


def test_validation_split_is_stratified_and_deterministic():
    x = np.arange(1000, dtype=np.float32).reshape(1000, 1)
    y = np.repeat(np.arange(10), 100)
    first = data.train_validation_split(x, y, 200, seed=3)
    second = data.train_validation_split(x, y, 200, seed=3)
    other = data.train_validation_split(x, y, 200, seed=4)
    x_train, y_train, x_val, y_val = first
    assert len(y_val) == 200 and np.all(np.bincount(y_val) == 20)
    assert not set(x_train.ravel()) & set(x_val.ravel())
    np.testing.assert_array_equal(first[2], second[2])
    assert not np.array_equal(first[2], other[2])


def test_validation_split_rejects_impossible_sizes():
    y = np.repeat(np.arange(10), 10)
    with pytest.raises(ValueError, match="validation_size=1.5"):
        data.train_validation_split(y[:, None], y, 1.5, seed=0)
    with pytest.raises(ValueError, match="validation_size=100"):
        data.train_validation_split(y[:, None], y, 100, seed=0)


def test_stratified_subset_keeps_classes_balanced():
    y = np.repeat(np.arange(10), 100)
    x_subset, y_subset = data.stratified_subset(y[:, None], y, 300, seed=0)
    assert len(y_subset) == 300 and np.all(np.bincount(y_subset) == 30)
    x_all, _ = data.stratified_subset(y[:, None], y, 0, seed=0)
    assert len(x_all) == 1000


def test_the_tests_trouser_picture_is_the_test_sets_first_trouser():
    # tests/pictures.py uploads this image without loading the dataset; it must still be the real article.
    dataset = data.load_fashion_mnist()
    first = int(np.flatnonzero(dataset.y_test == CLASS_NAMES.index("Trouser"))[0])
    assert first == TEST_TROUSER_INDEX, f"{TEST_TROUSER} is test image {TEST_TROUSER_INDEX}, not the first trousers"
    stored = (dataset.x_test[first, :, :, 0] * 255).round().astype(np.uint8)
    np.testing.assert_array_equal(trouser_article(), stored)
