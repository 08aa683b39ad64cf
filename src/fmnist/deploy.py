"""The deploy stage's work: export, check the exports against Keras, and run the benchmark."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

# bench and inference are the code `fmnist latency` measures with in the child processes started here: imported
# with this module, they count in the code digest of every stage that measures latency through it (05_deploy,
# 06_experiments), so a change to how latency is measured reruns those stages.
from fmnist import bench  # noqa: F401
from fmnist.config import NUM_CLASSES, ArtifactLayout, ExperimentsLayout
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


def probability_difference(served: np.ndarray, reference: np.ndarray) -> dict[str, float | int]:
    """For each image, the largest absolute difference over the classes between two sets of probabilities;
    its median, 99th percentile and maximum, and the number of images."""
    served, reference = np.asarray(served, dtype=np.float32), np.asarray(reference, dtype=np.float32)
    if reference.shape != served.shape or reference.ndim != 2 or reference.shape[1] != NUM_CLASSES:
        raise ValueError(
            f"reference probabilities have shape {reference.shape}; expected {served.shape}, "
            "one row of class probabilities per image."
        )
    largest = np.abs(served - reference).max(axis=1)
    return {
        "p50": float(np.percentile(largest, 50)),
        "p99": float(np.percentile(largest, 99)),
        "max": float(largest.max()),
        "images": len(largest),
    }


def probability_agreement(
    model_path: Path, images: np.ndarray, reference_probabilities: np.ndarray, batch: int = 500
) -> dict[str, float | int]:
    """How far an export's served probabilities are from the reference model's (the Keras model's): see
    :func:`probability_difference`."""
    return probability_difference(litert_probabilities(model_path, images, batch), reference_probabilities)


def served_figures(
    model_path: Path, x_test: np.ndarray, y_test: np.ndarray, keras_probabilities: np.ndarray
) -> dict[str, object]:
    """A LiteRT file judged as it serves: its test accuracy, and how far its probabilities are from the
    Keras model's (:func:`probability_difference`)."""
    probabilities = litert_probabilities(model_path, x_test)
    return {
        "test_accuracy": float(np.mean(probabilities.argmax(axis=1) == y_test)),
        "probability_difference": probability_difference(probabilities, keras_probabilities),
    }


def compare_quantisation(
    files: dict[str, Path],
    x_test: np.ndarray,
    y_test: np.ndarray,
    keras_probabilities: np.ndarray,
    *,
    latency_runs: int,
) -> list[dict[str, object]]:
    """One row per quantisation scheme (``files``: scheme -> .tflite): test accuracy, how far the served
    probabilities are from the Keras model's (99th percentile of the largest per-class difference), the
    single-image latency (p50, one thread, all timed in the same fresh processes) and the size."""
    latency = measure_latency_process(list(files.values()), latency_runs)
    rows = []
    for scheme, path in files.items():
        served = served_figures(path, x_test, y_test, keras_probabilities)
        rows.append(
            {
                "scheme": scheme,
                "test_accuracy": served["test_accuracy"],
                "probability_p99": served["probability_difference"]["p99"],
                "p50_ms": latency[Path(path).name]["p50_ms"],
                "size_bytes": Path(path).stat().st_size,
            }
        )
    return rows


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
    serve_model: str = "int8",
) -> Path:
    """Run ``fmnist bench`` in a fresh process (one thread per engine, no state from this kernel); its serving
    figures use ``serve_model`` ("float32", "int8" or "shipped")."""
    # The rest of the code the child process measures with (the load test, the server; bench and inference come
    # with this module), imported here so that it counts in the stage's code digest: changing it reruns the stage.
    from fmnist import loadtest, serve  # noqa: F401

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
        "--serve-model",
        serve_model,
    ]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    print(done.stdout)
    if done.returncode != 0:
        raise RuntimeError(f"fmnist bench failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return layout.bench


# The shipping rule of issue 13: the best validation accuracy among the int8 models that answer within
# this multiple of the seed network's int8 latency (measured in the same process) and fit in this size.
SHIP_LATENCY_RATIO = 1.5
SHIP_MAX_BYTES = 256 * 1024
# Issue 10: the probabilities served are within this of the Keras model's (99th percentile over the images of the
# largest per-class difference). The rule reads it on the validation images.
SHIP_PROBABILITY_TOLERANCE = 0.01


def shipping_candidates(
    study_model: Path,
    study_training: dict,
    experiments_dir: Path | None,
    external_input=lambda path: Path(path),
    study_agreement: dict | None = None,
) -> list[dict]:
    """The int8 models that may ship: the study's own, and each experiment recipe's exported model.

    Each is judged as it would be served: one call per image, no test-time augmentation. A recipe's
    validation accuracy is the mean over its seeds (without TTA): the exported seed alone may be the one
    whose validation split chose the recipe, which would flatter it. A recipe whose int8 file is not on
    disk, or is not the file its run exported (another run's, by its SHA-256), has ``file`` None and
    cannot ship. ``external_input`` records every file read from outside the run.

    ``probability_p99`` says how faithfully each int8 file serves its Keras model's probabilities (the 99th
    percentile over the test images of the largest per-class difference): ``study_agreement``'s for the
    study's model, the exporting run's record for a recipe's. It is shown beside the choice, not used in it.
    ``validation_p99`` is the same on the exporting seed's validation images, which the rule reads; the
    study's model has none (None: not measured).

    A final fit (its recipe's ``final_fit_of``) trained on its validation split too: it takes the validation
    accuracy of the recipe it refits (``judged_by``), whose runs chose its settings. Its own file's p99 on those
    images flatters it (its quantisation-aware epochs fitted exactly that gap on them), so its ``validation_p99``
    is the larger of that and the refitted recipe's, measured on images that recipe never trained on.
    """
    from fmnist.io import read_json
    from fmnist.runs import file_digest

    candidates = [
        {
            "name": "study (03_train)",
            "file": Path(study_model),
            "architecture": study_training["recipe"]["architecture"],
            "validation_accuracy": study_training["validation"]["accuracy"],
            "seed": None,
            "probability_p99": (study_agreement or {}).get("p99"),
            "validation_p99": None,
        }
    ]
    files = None if experiments_dir is None else ExperimentsLayout(experiments_dir)
    if files is None or not files.summary.is_file():
        return candidates

    @functools.cache
    def recipe_runs(name: str) -> tuple[dict, ...]:
        # Read once per recipe: a final fit reads the runs of the recipe it refits, listed on their own too.
        run_files = files.recipe_runs(name)
        for path in run_files:
            external_input(str(path))
        return tuple(read_json(path) for path in run_files)

    for row in read_json(files.summary)["recipes"]:
        name = row["recipe"]
        runs = recipe_runs(name)
        judged_by = ((runs[0].get("recipe") or {}).get("final_fit_of") or None) if runs else None
        exported = [run for run in runs if run.get("litert_files")]
        if not exported:
            continue
        path = files.models / exported[0]["litert_files"]["int8"]
        on_disk = file_digest(path) if path.is_file() else None
        matching = [run for run in exported if on_disk and (run.get("litert_sha256") or {}).get("int8") == on_disk]
        judging_runs = recipe_runs(judged_by) if judged_by else runs
        accuracies = [_validation_accuracy(run) for run in judging_runs]
        accuracies = [accuracy for accuracy in accuracies if accuracy is not None]
        validation_p99 = _served_p99(matching[0], "validation_probability_difference") if matching else None
        if judged_by and validation_p99 is not None:
            judging_p99 = [_served_p99(run, "validation_probability_difference") for run in judging_runs]
            judging_p99 = [p99 for p99 in judging_p99 if p99 is not None]
            validation_p99 = max([validation_p99, *judging_p99]) if judging_p99 else None
        candidates.append(
            {
                "name": name,
                "file": path if matching else None,
                "architecture": row["architecture"],
                "judged_by": judged_by,
                "validation_accuracy": float(np.mean(accuracies)) if accuracies else None,
                "seed": matching[0]["seed"] if matching else None,
                "probability_p99": _served_p99(matching[0]) if matching else None,
                "validation_p99": validation_p99,
            }
        )
    return candidates


def _validation_accuracy(run: dict) -> float | None:
    """A run's validation accuracy in one call per image (no TTA); None for a final fit, which has none."""
    plain = (run.get("validation_tta") or {}).get("accuracy_without")
    return plain if plain is not None else (run.get("validation") or {}).get("accuracy")


def _served_p99(run: dict, images: str = "probability_difference") -> float | None:
    """The exporting run's record of how far its int8 file's probabilities are from its Keras model's, on the
    test images (``probability_difference``) or the validation images (``validation_probability_difference``)."""
    served = (run.get("litert_served") or {}).get("int8") or {}
    return (served.get(images) or {}).get("p99")


def choose_shipped(
    candidates: list[dict],
    latency: dict[str, dict],
    reference: str,
    *,
    ratio: float = SHIP_LATENCY_RATIO,
    max_bytes: int = SHIP_MAX_BYTES,
    tolerance: float = SHIP_PROBABILITY_TOLERANCE,
) -> dict:
    """Apply the shipping rule: the best validation accuracy within the latency and size budgets, among the
    models whose served probabilities are faithful to their Keras model's when any within budget is.

    ``latency`` maps each candidate file's name to its figures (``p50_ms``,
    ``size_bytes``), all measured in one process; ``reference`` names the
    candidate whose latency sets the budget (the seed network's int8 model).
    A candidate is faithful when its ``validation_p99`` (see
    :func:`shipping_candidates`) is at most ``tolerance``; when no candidate
    within budget is, the best within budget ships and the choice says so.
    """
    by_name = {candidate["name"]: candidate for candidate in candidates}
    if reference not in by_name or by_name[reference]["file"] is None:
        raise ValueError(f"the reference model {reference!r} is not among the candidates on disk.")
    reference_ms = latency[Path(by_name[reference]["file"]).name]["p50_ms"]
    budget_ms = ratio * reference_ms
    rows = []
    for candidate in candidates:
        row = {key: candidate[key] for key in ("name", "architecture", "validation_accuracy", "seed")}
        row["judged_by"] = candidate.get("judged_by")
        row["probability_p99"] = candidate.get("probability_p99")
        row["validation_p99"] = candidate.get("validation_p99")
        row["faithful"] = None if row["validation_p99"] is None else row["validation_p99"] <= tolerance
        figures = latency.get(Path(candidate["file"]).name) if candidate["file"] is not None else None
        if row["validation_accuracy"] is None:
            row.update(
                p50_ms=None,
                latency_ratio=None,
                size_bytes=None,
                eligible=False,
                reason=(
                    f"no validation accuracy (the recipe it refits, {row['judged_by']}, has none)"
                    if row["judged_by"]
                    else "no validation accuracy in its runs"
                ),
            )
        elif figures is None:
            row.update(
                p50_ms=None,
                latency_ratio=None,
                size_bytes=None,
                eligible=False,
                reason="no int8 file on disk from its runs",
            )
        else:
            row.update(
                file=Path(candidate["file"]).name,
                p50_ms=figures["p50_ms"],
                latency_ratio=figures["p50_ms"] / reference_ms,
                size_bytes=figures["size_bytes"],
            )
            too_slow = figures["p50_ms"] > budget_ms
            too_big = figures["size_bytes"] > max_bytes
            row["eligible"] = not (too_slow or too_big)
            reasons = [f"{row['latency_ratio']:.2f}x the reference latency"] if too_slow else []
            reasons += [f"{figures['size_bytes'] / 1024:.0f} KB"] if too_big else []
            row["reason"] = "over budget: " + " and ".join(reasons) if reasons else "within budget"
        rows.append(row)
    eligible = [row for row in rows if row["eligible"]]
    if not eligible:
        raise ValueError(f"no candidate is within {ratio}x of {reference}'s latency and {max_bytes} bytes.")
    faithful = [row for row in eligible if row["faithful"]]
    for row in eligible:
        if faithful and not row["faithful"]:
            row["reason"] = (
                "within budget, but its validation p99 was not measured (faithful models are preferred)"
                if row["validation_p99"] is None
                else f"within budget, not faithful: validation p99 {row['validation_p99']:.4f} > {tolerance}"
            )
    # A final fit ties with the recipe it refits (the same validation figures) and ships in its place: the same
    # settings, trained on more images.
    shipped = max(faithful or eligible, key=lambda row: (row["validation_accuracy"], row["judged_by"] is not None))
    return {
        "rule": (
            f"the best validation accuracy (mean over the recipe's seeds, one call per image, no TTA) among the "
            f"int8 models within {ratio}x the seed network's int8 latency (p50, one thread, same process) and "
            f"{max_bytes // 1024} KB, keeping to those whose served probabilities stay within {tolerance} of their "
            "Keras model's on the validation images (99th percentile of the largest per-class difference) when "
            "any within budget does; a final fit (trained on the validation split too) takes the validation accuracy "
            "of the recipe it refits and the larger of its own validation p99 and that recipe's, and ships in its "
            "place on a tie"
        ),
        "reference": reference,
        "reference_p50_ms": reference_ms,
        "budget_ms": budget_ms,
        "max_bytes": max_bytes,
        "tolerance": tolerance,
        "faithful_within_budget": len(faithful),
        "candidates": rows,
        "shipped": shipped["name"],
        "shipped_file": shipped["file"],
    }


def latency_process(models: list[Path], runs: int, out: Path) -> dict[str, dict]:
    """Single-image LiteRT latency of ``models`` from one fresh ``fmnist latency`` process (no TensorFlow in
    it), which times them in turns, ``runs`` calls each, and writes its figures, keyed by file name, to
    ``out``."""
    from fmnist.io import read_json

    command = [sys.executable, "-m", "fmnist", "latency", *map(str, models), "--runs", str(runs), "--json", str(out)]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env=env)
    return read_json(out)


def measure_latency_process(models: list[Path], runs: int, rounds: int = 5) -> dict[str, dict]:
    """Single-image LiteRT latency of ``models``, keyed by file name, robust to a passing stall.

    ``rounds`` fresh ``fmnist latency`` processes each time every model for ``runs / rounds`` calls, in
    turn; a model's ``p50_ms`` is the median of its rounds' medians (``rounds_p50_ms`` lists them), so a
    stall of the machine during one model's turn does not decide the shipping rule.
    """
    import tempfile

    names = [Path(model).name for model in models]
    if len(set(names)) != len(names):
        raise ValueError(f"models share a file name, so their figures would mix: {sorted(names)}.")
    with tempfile.TemporaryDirectory() as directory:
        out = Path(directory) / "latency.json"
        per_round = [latency_process(models, max(1, runs // rounds), out) for _ in range(rounds)]
    figures = {}
    for name in names:
        medians = [figures_of_round[name]["p50_ms"] for figures_of_round in per_round]
        figures[name] = {**per_round[0][name], "p50_ms": float(np.median(medians)), "rounds_p50_ms": medians}
    return figures


def ship_best(
    layout: ArtifactLayout,
    experiments_dir: Path | None,
    x_test: np.ndarray,
    y_test: np.ndarray,
    *,
    latency_runs: int,
    external_input=lambda path: Path(path),
    study_agreement: dict | None = None,
) -> dict:
    """05_deploy's shipping step: gather the candidates, time them in one process, apply the rule, copy the
    chosen int8 file to ``layout.shipped_model`` atomically, then measure its test accuracy once.

    ``external_input`` records each file read from outside the run (``StageRun.external_input``);
    ``study_agreement`` is the study's int8 export's :func:`probability_agreement`.
    """
    from fmnist.io import atomic_path, read_json, write_json
    from fmnist.runs import file_digest

    candidates = shipping_candidates(
        layout.litert_model("int8"),
        read_json(layout.training_summary),
        experiments_dir,
        external_input,
        study_agreement,
    )
    on_disk = [candidate["file"] for candidate in candidates if candidate["file"] is not None]
    for path in on_disk[1:]:
        external_input(str(path))
    seed_networks = [c["name"] for c in candidates if c["architecture"] == "seed" and c["file"] is not None]
    if not seed_networks:
        raise ValueError("no int8 model of the seed network is on disk: the latency budget has no reference.")
    shipping = choose_shipped(candidates, measure_latency_process(on_disk, latency_runs), seed_networks[0])
    source = next(c["file"] for c in candidates if c["name"] == shipping["shipped"])
    with atomic_path(layout.shipped_model) as temporary:
        Path(temporary).write_bytes(Path(source).read_bytes())
    # Its digest lets the report say whether the package's default model (make ship-model) is this file.
    shipping["shipped_sha256"] = file_digest(layout.shipped_model)
    shipping["shipped_test_accuracy"] = litert_accuracy(layout.shipped_model, x_test, y_test)
    write_json(layout.shipping, shipping)
    return shipping
