"""The seed architecture, the metrics and the atomic saving of artifacts."""

from __future__ import annotations

import dataclasses
import os
import stat
import warnings
from pathlib import Path

import numpy as np
import pytest

from fmnist import evaluation, training
from fmnist.config import CLASS_NAMES, SEED_HYPERPARAMETERS
from fmnist.io import atomic_path, write_json
from fmnist.model import SEED_PARAMETER_COUNT, build_network
from fmnist.recipes import Recipe


def test_seed_architecture_has_the_seed_parameter_count_and_layers():
    model = build_network("seed", dropout_rate=0.3)
    assert model.count_params() == SEED_PARAMETER_COUNT == 206_026
    kinds = [layer.__class__.__name__ for layer in model.layers]
    assert kinds == [
        "Conv2D",
        "MaxPooling2D",
        "Conv2D",
        "MaxPooling2D",
        "Conv2D",
        "Flatten",
        "Dense",
        "Dropout",
        "Dense",
    ]
    assert model.get_layer("dropout").rate == 0.3
    assert model.output_shape == (None, 10)


def test_model_outputs_probabilities():
    model = build_network("seed")
    probabilities = model.predict(np.zeros((3, 28, 28, 1), dtype=np.float32), verbose=0)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


def test_model_rejects_bad_hyperparameters():
    with pytest.raises(ValueError, match="dropout_rate=1.0"):
        build_network("seed", dropout_rate=1.0)
    with pytest.raises(ValueError, match="learning_rate=0.0 must be positive"):
        Recipe("bad", learning_rate=0.0)


def test_metrics_match_hand_computed_values():
    y_true = np.array([0, 0, 1, 1, 6, 6])
    predicted = np.array([0, 6, 1, 1, 6, 0])
    probabilities = np.full((6, 10), 0.02)
    probabilities[np.arange(6), predicted] = 0.82
    metrics = evaluation.classification_metrics(y_true, probabilities)
    assert metrics["test_accuracy"] == pytest.approx(4 / 6)
    assert metrics["test_loss"] == pytest.approx(-(4 * np.log(0.82) + 2 * np.log(0.02)) / 6)
    assert metrics["per_class"]["Trouser"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 2}
    assert metrics["per_class"]["T-shirt/top"]["precision"] == pytest.approx(0.5)
    assert metrics["confusion_matrix"][0][6] == 1 and metrics["confusion_matrix"][6][0] == 1
    assert set(metrics["per_class"]) == set(CLASS_NAMES)


def test_metrics_reject_wrong_shapes():
    with pytest.raises(ValueError, match="expected"):
        evaluation.classification_metrics(np.array([0, 1]), np.ones((2, 9)))


def test_most_confused_pairs_and_confident_mistakes():
    matrix = np.diag([10] * 10)
    matrix[6, 0] = 7
    matrix[2, 4] = 3
    pairs = evaluation.most_confused_pairs(matrix, top=5)
    assert pairs == [
        {"true": "Shirt", "predicted": "T-shirt/top", "count": 7},
        {"true": "Pullover", "predicted": "Coat", "count": 3},
    ]
    probabilities = np.eye(10)[[0, 1, 2]] * 0.5 + 0.05
    probabilities[1] = np.eye(10)[3] * 0.9 + 0.01
    probabilities[2] = np.eye(10)[4] * 0.6 + 0.04
    mistakes = evaluation.most_confident_mistakes(np.array([0, 1, 2]), probabilities, 5)
    assert mistakes.tolist() == [1, 2]


def test_seed_comparison():
    comparison = evaluation.compare_with_seed({"test_accuracy": 0.93, "test_loss": 0.2})
    assert comparison["test_accuracy"]["difference"] == pytest.approx(0.03)
    assert comparison["test_loss"]["seed"] == 0.30


def test_failed_write_keeps_the_previous_file(tmp_path):
    target = write_json(tmp_path / "metrics.json", {"good": True})
    with pytest.raises(RuntimeError), atomic_path(target) as temporary:
        temporary.write_text("half")
        raise RuntimeError("crash while writing")
    assert target.read_text().strip().startswith("{") and "good" in target.read_text()
    assert list(tmp_path.iterdir()) == [target]


def test_atomic_writes_get_the_usual_permissions(tmp_path):
    old_mask = os.umask(0o022)
    try:
        target = write_json(tmp_path / "shared.json", {"readable": True})
    finally:
        os.umask(old_mask)
    # Readable by others, as any file written under umask 022 is; mkstemp alone would leave 0600.
    assert stat.S_IMODE(target.stat().st_mode) == 0o644


def test_failed_model_save_keeps_the_previous_model(tmp_path, monkeypatch):
    path = tmp_path / "model.keras"
    model = training.build(Recipe("saved"), train_images=64, seed=0)
    # Built as a trained model's is, so the saved optimizer loads without a mismatch warning.
    model.optimizer.build(model.trainable_variables)
    training.save_model(model, path)
    before = path.read_bytes()

    def broken_save(self, filepath, *args, **kwargs):
        Path(filepath).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(type(model), "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        training.save_model(model, path)
    assert path.read_bytes() == before
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # The kept file loads as saved: weights and optimizer, nothing skipped.
        assert training.load_model(path).count_params() == SEED_PARAMETER_COUNT


def test_choose_hyperparameters_falls_back_to_the_seed_and_checks_the_file(tmp_path):
    values, source = training.choose_hyperparameters(tmp_path / "missing.json")
    assert values == SEED_HYPERPARAMETERS and source.startswith("fallback")
    good = write_json(tmp_path / "best.json", {"learning_rate": 1e-4, "batch_size": 32, "dropout_rate": 0.1})
    assert training.choose_hyperparameters(good)[0]["batch_size"] == 32
    bad = write_json(tmp_path / "bad.json", {"learning_rate": 1e-4, "batch": 32})
    with pytest.raises(ValueError, match="Rerun the 02_tune stage"):
        training.choose_hyperparameters(bad)


def test_fit_runs_with_early_stopping_and_validation():
    rng = np.random.default_rng(0)
    x = rng.random((64, 28, 28, 1), dtype=np.float32)
    y = np.arange(64) % 10
    recipe = Recipe("tiny", learning_rate=1e-3, batch_size=32, dropout_rate=0.1, epochs=2, patience=1)
    fitted = training.fit(recipe, x, y, x[:20], y[:20], seed=0, verbose=0)
    assert set(fitted.history) >= {"loss", "val_loss", "accuracy", "val_accuracy", "epoch_seconds"}
    assert 1 <= fitted.best_epoch <= fitted.epochs_run <= 2
    # One seed drives everything: the same seed gives the same epochs, another seed others.
    again = training.fit(recipe, x, y, x[:20], y[:20], seed=0, verbose=0)
    other = training.fit(recipe, x, y, x[:20], y[:20], seed=1, verbose=0)
    assert again.history["loss"] == fitted.history["loss"] and other.history["loss"] != fitted.history["loss"]
    # The study's recipe options train too.
    cosine = training.fit(
        dataclasses.replace(recipe, schedule="cosine", horizontal_flip=True),
        x,
        y,
        x[:20],
        y[:20],
        seed=0,
        verbose=0,
    )
    assert cosine.history["loss"] != fitted.history["loss"]
    summary = fitted.summary(recipe, len(y))
    assert summary["parameters"] == SEED_PARAMETER_COUNT and summary["train_images"] == 64
    assert summary["validation"]["loss"] == fitted.history["val_loss"][fitted.best_epoch - 1]
