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


class TensorBoardLog:
    """A log directory read the way TensorBoard reads it (every event file in the directory)."""

    @staticmethod
    def _load(directory: Path):
        from tensorboard.backend.event_processing import event_accumulator

        accumulator = event_accumulator.EventAccumulator(str(directory), size_guidance={event_accumulator.TENSORS: 0})
        accumulator.Reload()
        return accumulator

    @classmethod
    def scalars(cls, directory: Path, tag: str) -> list[tuple[int, float]]:
        """(step, value) of one scalar, e.g. ``epoch_loss`` in ``<log>/validation``; empty when absent."""
        from tensorboard.util import tensor_util

        accumulator = cls._load(directory)
        if tag not in accumulator.Tags()["tensors"]:
            return []
        return [(event.step, float(tensor_util.make_ndarray(event.tensor_proto))) for event in accumulator.Tensors(tag)]

    @classmethod
    def hparams(cls, directory: Path) -> dict | None:
        """The HParams dashboard's view of a trial: its hyperparameters, and ``ended`` when it finished."""
        from tensorboard.plugins.hparams import api_pb2, metadata

        content = cls._load(directory).PluginTagToContent("hparams")
        if metadata.SESSION_START_INFO_TAG not in content:
            return None
        start = metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG])
        values = {
            name: value.number_value if value.HasField("number_value") else value.string_value
            for name, value in start.hparams.items()
        }
        end = content.get(metadata.SESSION_END_INFO_TAG)
        values["ended"] = (
            end is not None and metadata.parse_session_end_info_plugin_data(end).status == api_pb2.STATUS_SUCCESS
        )
        return values


@pytest.fixture
def tensorboard_log():
    return TensorBoardLog


# `make test` runs the tests and nbval over the notebooks in pytest-xdist workers (-n 2), each work unit on one
# worker, in order. The notebooks are one unit: they pass files through build/interactive (04_evaluate reads the
# model 03_train wrote), so they run as a chain. Every test file is a unit of its own, so test_pipeline.py's session
# fixture, the smoke chain, runs once.
@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class FilesAndTheNotebooksAsOne(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return "notebooks" if path.endswith(".ipynb") else path

    return FilesAndTheNotebooksAsOne(config, log)


def pytest_collection_modifyitems(items):
    # The longest units first (with --no-loadscope-reorder, the workers take them in this order), so that neither
    # worker is left running one alone at the end: the smoke chain's tests, the smoke experiments, the notebooks.
    longest = ("test_pipeline.py", "test_experiments_stage.py", ".ipynb")

    def rank(item) -> int:
        return next((place for place, end in enumerate(longest) if item.path.name.endswith(end)), len(longest))

    items.sort(key=rank)
