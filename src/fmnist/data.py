"""Load Fashion-MNIST from its IDX files, verified, and split it.

The four files are looked for, in order, in ``$FMNIST_DATA_DIR``, in the Debian
package's directory, in the Keras cache and, as a last resort, downloaded from
the official mirror into the Keras cache. Each file may be gzipped or not; its
*decompressed* bytes are checked against a pinned SHA-256, because Debian
recompresses the archives (so the ``.gz`` checksums differ from upstream).

Anything wrong with a file raises :class:`DataError`, which names the file, the
problem and the fix. Nothing is ever loaded partially.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import tempfile
import urllib.request
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fmnist.config import CLASS_NAMES, IMAGE_SIZE

DEBIAN_DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
KERAS_CACHE_DIR = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "datasets" / "fashion-mnist"
DOWNLOAD_URL = "https://storage.googleapis.com/tensorflow/tf-keras-datasets/"

IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049

HOW_TO_GET_DATA = (
    "Install the Debian package (`apt-get install dataset-fashion-mnist`, as root), "
    "or put the four official files (train-images-idx3-ubyte.gz, ...) in a directory "
    "and set FMNIST_DATA_DIR to it."
)


class DataError(ValueError):
    """A Fashion-MNIST file is missing or not what it should be."""


@dataclass(frozen=True)
class IdxFile:
    """What one of the four official files must contain."""

    name: str
    magic: int
    count: int
    sha256: str  # Of the decompressed bytes.


FILES = {
    "train_images": IdxFile(
        "train-images-idx3-ubyte",
        IMAGES_MAGIC,
        60_000,
        "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    ),
    "train_labels": IdxFile(
        "train-labels-idx1-ubyte",
        LABELS_MAGIC,
        60_000,
        "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    ),
    "test_images": IdxFile(
        "t10k-images-idx3-ubyte",
        IMAGES_MAGIC,
        10_000,
        "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    ),
    "test_labels": IdxFile(
        "t10k-labels-idx1-ubyte",
        LABELS_MAGIC,
        10_000,
        "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    ),
}


@dataclass
class FashionMNIST:
    """The whole data set: images scaled to [0, 1] float32 with a channel axis, labels 0-9."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray | None
    y_test: np.ndarray | None
    source: str
    checksums: dict[str, str] = field(default_factory=dict)
    class_names: tuple[str, ...] = CLASS_NAMES


def find_file(directory: Path, name: str) -> Path | None:
    """Return ``name.gz`` or ``name`` inside ``directory``, whichever exists."""
    for candidate in (directory / f"{name}.gz", directory / name):
        if candidate.is_file():
            return candidate
    return None


def _decompressed_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as handle:
                return handle.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as error:
        raise DataError(
            f"{path}: cannot be decompressed ({error}); the file is truncated or corrupt. "
            f"Delete it and fetch it again. {HOW_TO_GET_DATA}"
        ) from error


def read_idx(path: Path, spec: IdxFile, *, verify_checksum: bool = True) -> tuple[np.ndarray, str]:
    """Read one IDX file into a uint8 array and return it with its SHA-256.

    The header (magic number, item count, image size) and the length are checked
    before the checksum, so that the error says *what* is wrong, not just *that*
    something is.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file is missing. {HOW_TO_GET_DATA}")
    raw = _decompressed_bytes(path)
    header_size = 16 if spec.magic == IMAGES_MAGIC else 8
    if len(raw) < header_size:
        raise DataError(
            f"{path}: truncated: {len(raw)} bytes is shorter than the {header_size}-byte IDX header. "
            "Delete the file and fetch it again."
        )
    magic, count = (int(v) for v in np.frombuffer(raw[:8], dtype=">u4"))
    if magic != spec.magic:
        kind = "images" if spec.magic == IMAGES_MAGIC else "labels"
        raise DataError(
            f"{path}: wrong magic number {magic} (an IDX {kind} file starts with {spec.magic}). "
            f"This is not the {spec.name} file; check the file name and fetch it again."
        )
    if count != spec.count:
        raise DataError(
            f"{path}: wrong count: the header says {count} items, {spec.name} has {spec.count}. "
            f"The file is from another data set or was cut; fetch the official file. {HOW_TO_GET_DATA}"
        )
    item_size = 1
    if spec.magic == IMAGES_MAGIC:
        rows, cols = (int(v) for v in np.frombuffer(raw[8:16], dtype=">u4"))
        if (rows, cols) != (IMAGE_SIZE, IMAGE_SIZE):
            raise DataError(f"{path}: images are {rows}x{cols}, expected {IMAGE_SIZE}x{IMAGE_SIZE}.")
        item_size = rows * cols
    expected_length = header_size + count * item_size
    if len(raw) != expected_length:
        problem = "truncated" if len(raw) < expected_length else "has trailing bytes"
        raise DataError(
            f"{path}: {problem}: {len(raw)} bytes where the header promises {expected_length}. "
            "Delete the file and fetch it again."
        )
    digest = hashlib.sha256(raw).hexdigest()
    if verify_checksum and digest != spec.sha256:
        raise DataError(
            f"{path}: checksum mismatch: SHA-256 of the decompressed content is {digest}, "
            f"expected {spec.sha256}. The file is corrupt or not the official one; fetch it again."
        )
    array = np.frombuffer(raw, dtype=np.uint8, offset=header_size).copy()
    if spec.magic == IMAGES_MAGIC:
        array = array.reshape(count, IMAGE_SIZE, IMAGE_SIZE)
    elif array.max(initial=0) >= len(CLASS_NAMES):
        raise DataError(f"{path}: label {int(array.max())} is outside 0-{len(CLASS_NAMES) - 1}.")
    return array, digest


def _download(directory: Path, timeout: float = 30.0) -> None:
    """Fetch the four official files into ``directory``; each lands atomically or not at all."""
    directory.mkdir(parents=True, exist_ok=True)
    for spec in FILES.values():
        target = directory / f"{spec.name}.gz"
        if target.is_file():
            continue
        with (
            urllib.request.urlopen(DOWNLOAD_URL + target.name, timeout=timeout) as response,
            tempfile.NamedTemporaryFile(dir=directory, delete=False, suffix=".part") as handle,
        ):
            shutil.copyfileobj(response, handle)
        os.replace(handle.name, target)


def candidate_directories() -> list[tuple[str, Path]]:
    """Where the files are looked for, in order, with a label for each place."""
    places = []
    if os.environ.get("FMNIST_DATA_DIR"):
        places.append(("FMNIST_DATA_DIR", Path(os.environ["FMNIST_DATA_DIR"])))
    places += [("Debian package", DEBIAN_DATA_DIR), ("Keras cache", KERAS_CACHE_DIR)]
    return places


def locate_data_dir(*, allow_download: bool | None = None) -> tuple[str, Path]:
    """Return the first place that holds all four files, downloading as a last resort.

    A directory named by ``FMNIST_DATA_DIR`` must be complete: a missing file
    there is an error, not a reason to look elsewhere.
    """
    if allow_download is None:
        allow_download = os.environ.get("FMNIST_OFFLINE", "") not in ("1", "true", "yes")
    searched = []
    for label, directory in candidate_directories():
        present = {key: find_file(directory, spec.name) for key, spec in FILES.items()}
        if all(present.values()):
            return label, directory
        if label == "FMNIST_DATA_DIR":
            missing = [FILES[key].name for key, path in present.items() if path is None]
            raise DataError(
                f"FMNIST_DATA_DIR={directory}: file is missing: {', '.join(missing)} (.gz or uncompressed). "
                "Put all four official files there, or unset FMNIST_DATA_DIR."
            )
        searched.append(str(directory))
    if allow_download:
        try:
            _download(KERAS_CACHE_DIR)
            return "official download", KERAS_CACHE_DIR
        except OSError as error:
            searched.append(f"download from {DOWNLOAD_URL} ({error})")
    raise DataError("Fashion-MNIST not found; looked in: " + "; ".join(searched) + ". " + HOW_TO_GET_DATA)


def scale_images(images: np.ndarray) -> np.ndarray:
    """uint8 (N, 28, 28) -> float32 (N, 28, 28, 1) in [0, 1]: the model's input."""
    return (images.astype(np.float32) / 255.0)[..., np.newaxis]


def shifted(images: np.ndarray, rows: int, columns: int) -> np.ndarray:
    """Images of shape (n, height, width, channels) moved ``rows`` pixels down and ``columns`` right (negative:
    up, left), filled with black: the whole-pixel shifts of the training's augmentation."""
    height, width = images.shape[1:3]
    pad = max(abs(rows), abs(columns))
    padded = np.pad(images, [(0, 0), (pad, pad), (pad, pad), (0, 0)])
    return padded[:, pad - rows : pad - rows + height, pad - columns : pad - columns + width]


def _tta_shifts(shifts: int) -> list[tuple[int, int]]:
    """The (rows, columns) moves of test-time augmentation besides the image itself: none, or four."""
    return [(-shifts, 0), (shifts, 0), (0, -shifts), (0, shifts)] if shifts else []


def tta_views(images: np.ndarray, shifts: int = 0) -> list[np.ndarray]:
    """What test-time augmentation looks at: the images and their mirror images, and with ``shifts`` the images
    moved that many pixels up, down, left and right, each with its mirror image (10 views). The first view is
    the images themselves."""
    views = [images, images[:, :, ::-1]]
    for rows, columns in _tta_shifts(shifts):
        view = shifted(images, rows, columns)
        views += [view, view[:, :, ::-1]]
    return views


def tta_view_count(shifts: int) -> int:
    """How many views :func:`tta_views` gives."""
    return 2 * (1 + len(_tta_shifts(shifts)))


def load_fashion_mnist(data_dir: str | os.PathLike[str] | None = None, *, include_test: bool = True) -> FashionMNIST:
    """Load and verify the files; images scaled to [0, 1] float32.

    Tuning and training pass ``include_test=False`` so the test set cannot leak
    into them: only what reports figures after the choices reads it (the
    evaluation stage, each experiment run's test figures, 05_deploy's measurement
    of the shipped file, ``fmnist bench`` and ``fmnist latency``), and the EDA's
    balance and duplicate checks.
    """
    if data_dir is None:
        source, directory = locate_data_dir()
    else:
        source, directory = "data_dir argument", Path(data_dir)
    arrays, checksums = {}, {}
    for key, spec in FILES.items():
        if key.startswith("test") and not include_test:
            continue
        path = find_file(directory, spec.name) or directory / f"{spec.name}.gz"
        arrays[key], checksums[spec.name] = read_idx(path, spec)
    return FashionMNIST(
        x_train=scale_images(arrays["train_images"]),
        y_train=arrays["train_labels"],
        x_test=scale_images(arrays["test_images"]) if include_test else None,
        y_test=arrays["test_labels"] if include_test else None,
        source=f"{source}: {directory}",
        checksums=checksums,
    )


def stratified_subset(x: np.ndarray, y: np.ndarray, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A class-balanced random subset of ``size`` examples (all of them when ``size`` is 0)."""
    if size <= 0 or size >= len(y):
        return x, y
    from sklearn.model_selection import train_test_split

    x_subset, _, y_subset, _ = train_test_split(x, y, train_size=size, stratify=y, random_state=seed)
    return x_subset, y_subset


def train_validation_split(
    x: np.ndarray, y: np.ndarray, validation_size: float | int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Deterministic stratified split of the training set: ``x_train, y_train, x_val, y_val``."""
    from sklearn.model_selection import train_test_split

    if isinstance(validation_size, float) and not 0.0 < validation_size < 1.0:
        raise ValueError(f"validation_size={validation_size}: a fraction must be between 0 and 1.")
    if isinstance(validation_size, int) and not 0 < validation_size < len(y):
        raise ValueError(f"validation_size={validation_size}: a count must be between 1 and {len(y) - 1}.")
    x_train, x_val, y_train, y_val = train_test_split(x, y, test_size=validation_size, stratify=y, random_state=seed)
    return x_train, y_train, x_val, y_val
