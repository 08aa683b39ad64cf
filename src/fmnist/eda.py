"""Exploratory summaries of the data set: balance, mean images, intensities, duplicates."""

from __future__ import annotations

import hashlib
from collections import defaultdict

import numpy as np

from fmnist.config import CLASS_NAMES, NUM_CLASSES


def class_counts(labels: np.ndarray) -> dict[str, int]:
    counts = np.bincount(labels, minlength=NUM_CLASSES)
    return {name: int(count) for name, count in zip(CLASS_NAMES, counts, strict=False)}


def mean_images(images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The mean image of each class, shape (10, 28, 28)."""
    return np.stack([images[labels == label].mean(axis=0).squeeze(-1) for label in range(NUM_CLASSES)])


def intensity_statistics(images: np.ndarray, labels: np.ndarray) -> dict[str, dict[str, float]]:
    """Per-class mean pixel value, fraction of black (zero) pixels and mean ink (non-zero) value."""
    statistics = {}
    for label, name in enumerate(CLASS_NAMES):
        pixels = images[labels == label]
        nonzero = pixels[pixels > 0]
        statistics[name] = {
            "mean_intensity": float(pixels.mean()),
            "black_fraction": float((pixels == 0).mean()),
            "mean_ink_intensity": float(nonzero.mean()) if nonzero.size else 0.0,
        }
    return statistics


def find_duplicates(splits: dict[str, np.ndarray]) -> dict[str, object]:
    """Exact duplicate images within and across splits, found by hashing the pixel bytes.

    Returns counts per split and across splits, and up to a few example groups as
    ``[(split, index), ...]`` so the notebook can show them.
    """
    groups: dict[bytes, list[tuple[str, int]]] = defaultdict(list)
    for split, images in splits.items():
        for index, image in enumerate(images):
            groups[hashlib.blake2b(image.tobytes(), digest_size=16).digest()].append((split, index))
    duplicate_groups = [members for members in groups.values() if len(members) > 1]
    within = {split: 0 for split in splits}
    across = 0
    for members in duplicate_groups:
        split_names = {split for split, _ in members}
        for split in split_names:
            # Extra copies inside one split beyond the first.
            within[split] += max(0, sum(1 for s, _ in members if s == split) - 1)
        if len(split_names) > 1:
            across += 1
    return {
        "duplicate_groups": len(duplicate_groups),
        "extra_copies_within_split": within,
        "groups_spanning_splits": across,
        "examples": duplicate_groups[:8],
    }


def summarize(x_train, y_train, x_test, y_test) -> dict[str, object]:
    """Everything the EDA stage reports, as plain data."""
    return {
        "train_size": int(len(y_train)),
        "test_size": int(len(y_test)),
        "class_counts": {"train": class_counts(y_train), "test": class_counts(y_test)},
        "intensity": {"train": intensity_statistics(x_train, y_train)},
        "pixel_mean": float(x_train.mean()),
        "pixel_std": float(x_train.std()),
        "duplicates": find_duplicates({"train": x_train, "test": x_test}),
    }
