"""The deploy stage's work: export, check the exports against Keras, and run the benchmark."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from fmnist.config import ArtifactLayout
from fmnist.inference import Classifier

# How far an export's test accuracy may fall from the Keras model's, in accuracy points.
TOLERANCE_POINTS = {"float32": 0.1, "int8": 0.5}


def litert_accuracy(model_path: Path, images: np.ndarray, labels: np.ndarray, batch: int = 500) -> float:
    classifier = Classifier(model_path, num_threads=os.cpu_count() or 1)
    predictions = np.concatenate(
        [
            classifier.probabilities(images[start : start + batch]).argmax(axis=1)
            for start in range(0, len(images), batch)
        ]
    )
    return float((predictions == labels).mean())


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


def run_benchmark_process(layout: ArtifactLayout, *, seconds: float, clients: int, rate: float, runs: int) -> Path:
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
    ]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    print(done.stdout)
    if done.returncode != 0:
        raise RuntimeError(f"fmnist bench failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return layout.bench
