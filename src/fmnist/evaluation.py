"""Test-set metrics with scikit-learn: accuracy, loss, per-class scores, confusions."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, log_loss, precision_recall_fscore_support

from fmnist.config import CLASS_NAMES, NUM_CLASSES, SEED_CLAIMS


def classification_metrics(y_true: np.ndarray, probabilities: np.ndarray) -> dict[str, object]:
    """Accuracy, cross-entropy, per-class precision/recall/F1/support and the confusion matrix."""
    if probabilities.shape != (len(y_true), NUM_CLASSES):
        raise ValueError(f"probabilities have shape {probabilities.shape}; expected ({len(y_true)}, {NUM_CLASSES}).")
    y_pred = probabilities.argmax(axis=1)
    labels = list(range(NUM_CLASSES))
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    per_class = {
        name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
        for name, p, r, f, s in zip(CLASS_NAMES, precision, recall, f1, support, strict=False)
    }
    macro = precision_recall_fscore_support(y_true, y_pred, labels=labels, average="macro", zero_division=0)
    return {
        "test_accuracy": float(accuracy_score(y_true, y_pred)),
        "test_loss": float(log_loss(y_true, probabilities, labels=labels)),
        "test_error_count": int((y_pred != y_true).sum()),
        "test_size": int(len(y_true)),
        "macro_precision": float(macro[0]),
        "macro_recall": float(macro[1]),
        "macro_f1": float(macro[2]),
        "per_class": per_class,
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }


def most_confused_pairs(matrix: np.ndarray | list, top: int = 5) -> list[dict[str, object]]:
    """The off-diagonal cells with the most errors: true class, predicted class, count."""
    matrix = np.asarray(matrix).copy()
    np.fill_diagonal(matrix, 0)
    order = np.argsort(matrix, axis=None)[::-1][:top]
    pairs = []
    for flat in order:
        true, predicted = np.unravel_index(flat, matrix.shape)
        if matrix[true, predicted] == 0:
            break
        count = int(matrix[true, predicted])
        pairs.append({"true": CLASS_NAMES[true], "predicted": CLASS_NAMES[predicted], "count": count})
    return pairs


def most_confident_mistakes(y_true: np.ndarray, probabilities: np.ndarray, count: int) -> np.ndarray:
    """Indices of misclassified examples, the most confidently wrong first."""
    y_pred = probabilities.argmax(axis=1)
    wrong = np.flatnonzero(y_pred != y_true)
    confidence = probabilities[wrong, y_pred[wrong]]
    return wrong[np.argsort(-confidence)][:count]


def compare_with_seed(metrics: dict[str, object]) -> dict[str, dict[str, float]]:
    """The seed's claimed test accuracy and loss beside ours."""
    return {
        key: {"seed": claimed, "ours": float(metrics[key]), "difference": float(metrics[key]) - claimed}
        for key, claimed in SEED_CLAIMS.items()
    }


def calibration(y_true: np.ndarray, probabilities: np.ndarray, bins: int = 15) -> dict[str, object]:
    """Expected calibration error of the top-class confidence, and the reliability diagram's bins.

    The confidences are split into ``bins`` equal-width bins; the ECE is the
    bin-size-weighted mean gap between each bin's accuracy and its mean
    confidence (Guo et al., 2017).
    """
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == y_true
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    table, ece = [], 0.0
    for index in range(bins):
        members = which == index
        count = int(members.sum())
        if count == 0:
            continue
        accuracy, mean_confidence = float(correct[members].mean()), float(confidence[members].mean())
        ece += count / len(y_true) * abs(accuracy - mean_confidence)
        table.append(
            {
                "lower": float(edges[index]),
                "upper": float(edges[index + 1]),
                "count": count,
                "accuracy": accuracy,
                "confidence": mean_confidence,
            }
        )
    return {"ece": float(ece), "bins": table}
