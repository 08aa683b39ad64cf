"""The deploy stage's work: export, check the exports against Keras, and run the benchmark."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from fmnist.config import NUM_CLASSES, ArtifactLayout
from fmnist.inference import Classifier

# How far an export's test accuracy may fall from the Keras model's, in accuracy points.
TOLERANCE_POINTS = {"float32": 0.1, "int8": 0.5}


def litert_probabilities(model_path: Path, images: np.ndarray, batch: int = 500) -> np.ndarray:
    """The probabilities (N, 10) a LiteRT model serves for ``images``, as the classifier computes them."""
    classifier = Classifier(model_path, num_threads=os.cpu_count() or 1)
    return np.concatenate(
        [classifier.probabilities(images[start : start + batch]) for start in range(0, len(images), batch)]
    )


def litert_accuracy(model_path: Path, images: np.ndarray, labels: np.ndarray, batch: int = 500) -> float:
    predictions = litert_probabilities(model_path, images, batch).argmax(axis=1)
    return float((predictions == labels).mean())


def probability_agreement(
    model_path: Path, images: np.ndarray, reference_probabilities: np.ndarray, batch: int = 500
) -> dict[str, float | int]:
    """How far an export's served probabilities are from the reference model's (the Keras model's).

    For each image, the largest absolute difference over the classes; returns the median, the 99th
    percentile and the maximum of it over ``images``, and the number of images.
    """
    reference = np.asarray(reference_probabilities, dtype=np.float32)
    if reference.shape != (len(images), NUM_CLASSES):
        raise ValueError(
            f"reference_probabilities has shape {reference.shape}; expected ({len(images)}, {NUM_CLASSES}), "
            "one row of class probabilities per image."
        )
    largest = np.abs(litert_probabilities(model_path, images, batch) - reference).max(axis=1)
    return {
        "p50": float(np.percentile(largest, 50)),
        "p99": float(np.percentile(largest, 99)),
        "max": float(largest.max()),
        "images": len(images),
    }


def compare_accuracy(keras_accuracy: float, exported: dict[str, float]) -> list[dict[str, object]]:
    """One row per model; raises when an export falls outside its tolerance."""
    rows = [{"model": "keras", "test_accuracy": keras_accuracy, "difference_points": 0.0, "tolerance_points": None}]
    failures = []
    for kind, accuracy in exported.items():
        difference = (accuracy - keras_accuracy) * 100
        rows.append(
            {
                "model": f"litert_{kind}",
                "test_accuracy": accuracy,
                "difference_points": difference,
                "tolerance_points": TOLERANCE_POINTS[kind],
            }
        )
        if abs(difference) > TOLERANCE_POINTS[kind]:
            failures.append(f"{kind}: {difference:+.2f} points (tolerance {TOLERANCE_POINTS[kind]})")
    if failures:
        raise ValueError(f"exported model disagrees with Keras on the test set: {'; '.join(failures)}.")
    return rows


def run_benchmark_process(
    layout: ArtifactLayout,
    *,
    seconds: float,
    clients: int,
    rate: float,
    runs: int,
    closed_clients: int = 64,
    slow_clients: int = 500,
) -> Path:
    """Run ``fmnist bench`` in a fresh process (one thread per engine, no state from this kernel)."""
    command = [
        sys.executable,
        "-m",
        "fmnist",
        "bench",
        "--out",
        str(layout.root),
        "--seconds",
        str(seconds),
        "--clients",
        str(clients),
        "--rate",
        str(rate),
        "--runs",
        str(runs),
        "--closed-clients",
        str(closed_clients),
        "--slow-clients",
        str(slow_clients),
    ]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    print(done.stdout)
    if done.returncode != 0:
        raise RuntimeError(f"fmnist bench failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return layout.bench
