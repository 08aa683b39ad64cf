"""Shared fixtures: small IDX files written by the tests themselves."""

from __future__ import annotations

import gzip
import hashlib
import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from fmnist import data  # noqa: E402


def idx_bytes(array: np.ndarray, magic: int, count: int | None = None) -> bytes:
    """Encode ``array`` as an IDX file; ``count`` overrides the header's item count."""
    header = [magic, len(array) if count is None else count]
    if array.ndim == 3:
        header += list(array.shape[1:])
    return np.array(header, dtype=">u4").tobytes() + array.astype(np.uint8).tobytes()


def write_idx(path: Path, payload: bytes, *, compress: bool = True) -> Path:
    if compress:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as handle:
            handle.write(payload)
    else:
        path.write_bytes(payload)
    return path


@pytest.fixture
def small_dataset(tmp_path, monkeypatch):
    """A complete, valid little data set (50 train, 20 test images) with matching pinned specs."""
    rng = np.random.default_rng(0)
    sizes = {"train": 50, "test": 20}
    specs = {}
    arrays = {}
    for split, size in sizes.items():
        images = rng.integers(0, 256, size=(size, 28, 28), dtype=np.uint8)
        labels = np.arange(size, dtype=np.uint8) % 10
        for kind, array, magic in (("images", images, data.IMAGES_MAGIC), ("labels", labels, data.LABELS_MAGIC)):
            key = f"{split}_{kind}"
            name = data.FILES[key].name
            payload = idx_bytes(array, magic)
            write_idx(tmp_path / name, payload)
            specs[key] = data.IdxFile(name, magic, size, hashlib.sha256(payload).hexdigest())
            arrays[key] = array
    monkeypatch.setattr(data, "FILES", specs)
    return tmp_path, arrays
