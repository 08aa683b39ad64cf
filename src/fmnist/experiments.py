"""Multi-seed experiments: train recipes, evaluate them once on the test set, export them to LiteRT.

Each (recipe, seed) run writes one JSON file below ``experiments/runs/``; a
rerun skips the runs whose file exists, so the reference runs can be spread
over several sessions and an interrupted run loses only the model in training.
Hyperparameters and early stopping only ever see the validation split: the
test set is evaluated once, after training, for the tables.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from fmnist.io import atomic_path, read_json, write_json
from fmnist.recipes import Recipe
from fmnist.runtime import quiet_tensorflow

quiet_tensorflow()

import keras  # noqa: E402

from fmnist import evaluation  # noqa: E402
from fmnist.training import discard_checkpoint, fit, training_code_version  # noqa: E402


def _say(message: str) -> None:
    print(f"[experiments] {message}", file=sys.stderr, flush=True)


def predict(model: keras.Model, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities without and with flip TTA (the mean of the image's and its mirror image's)."""
    plain = model.predict(images, batch_size=1000, verbose=0)
    mirrored = model.predict(images[:, :, ::-1, :], batch_size=1000, verbose=0)
    return plain, (plain + mirrored) / 2


def scores(y_true: np.ndarray, probabilities: np.ndarray) -> dict[str, Any]:
    """Accuracy, loss and calibration of one set of predictions."""
    metrics = evaluation.classification_metrics(y_true, probabilities)
    calibration = evaluation.calibration(y_true, probabilities)
    return {
        "accuracy": metrics["test_accuracy"],
        "loss": metrics["test_loss"],
        "macro_f1": metrics["macro_f1"],
        "ece": calibration["ece"],
        "reliability": calibration["bins"],
        "per_class_f1": {name: values["f1"] for name, values in metrics["per_class"].items()},
    }


def run_path(runs_dir: Path, recipe: Recipe, seed: int) -> Path:
    return Path(runs_dir) / recipe.name / f"seed{seed}.json"


def run_one(
    recipe: Recipe,
    seed: int,
    *,
    x_train_full: np.ndarray,
    y_train_full: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    validation_size: int,
    train_subset: int,
    runs_dir: Path,
    models_dir: Path | None,
    representative_images: int = 500,
    checkpoint_dir: Path | None = None,
    verbose: int = 2,
) -> dict[str, Any]:
    """Train and evaluate one recipe with one seed; write its result (and, if asked, its LiteRT models).

    With ``checkpoint_dir`` a killed run resumes at its last complete epoch.
    """
    from fmnist import data

    x_train, y_train, x_val, y_val = data.train_validation_split(x_train_full, y_train_full, validation_size, seed)
    x_train, y_train = data.stratified_subset(x_train, y_train, train_subset, seed)
    fitted = fit(recipe, x_train, y_train, x_val, y_val, seed=seed, checkpoint_dir=checkpoint_dir, verbose=verbose)
    validation_plain, validation_mirrored = predict(fitted.model, x_val)
    plain, mirrored = predict(fitted.model, x_test)
    result = {
        **fitted.summary(recipe, len(y_train)),
        "seed": seed,
        # Stored runs are kept while their recipe is unchanged; this says which training code made them.
        "training_code": training_code_version(),
        # Whether flip TTA helps is read here, on validation, never from the test columns below.
        "validation_tta": {
            "accuracy_without": float(np.mean(validation_plain.argmax(axis=1) == y_val)),
            "accuracy_with": float(np.mean(validation_mirrored.argmax(axis=1) == y_val)),
        },
        "history": fitted.history,
        "test": scores(y_test, mirrored if recipe.tta else plain),
        "test_without_tta": scores(y_test, plain),
        "test_with_tta": scores(y_test, mirrored),
    }
    if models_dir is not None:
        result["litert_files"] = export_litert(fitted.model, x_train[:representative_images], models_dir, recipe.name)
    write_json(run_path(runs_dir, recipe, seed), result)
    if checkpoint_dir is not None:
        discard_checkpoint(checkpoint_dir)
    return result


def export_litert(model: keras.Model, representative: np.ndarray, models_dir: Path, name: str) -> dict[str, str]:
    """float32 and int8 LiteRT files of a trained model, for the latency and size columns."""
    from fmnist import export

    files = {
        "float32": export.write_model(export.to_float32(model), Path(models_dir) / f"{name}_float32.tflite"),
        "int8": export.write_model(export.to_int8(model, representative), Path(models_dir) / f"{name}_int8.tflite"),
    }
    with atomic_path(Path(models_dir) / f"{name}.keras") as temporary:
        model.save(temporary)
    return {kind: path.name for kind, path in files.items()}


def _stored_recipe(values: dict[str, Any]) -> Recipe | None:
    """The recipe a stored run was trained with; fields added since take their defaults (the old behaviour)."""
    try:
        return Recipe(**values)
    except (TypeError, ValueError):
        return None


def run_all(
    plan: Iterable[tuple[Recipe, int]],
    *,
    runs_dir: Path,
    models_dir: Path,
    train_missing: bool = True,
    force: bool = False,
    progress: Callable[[str], None] = _say,
    **data_and_settings: Any,
) -> tuple[list[dict[str, Any]], list[str]]:
    """Run every (recipe, seed) of ``plan`` that has no result yet.

    Returns the results in plan order and the runs still missing (those not
    trained because ``train_missing`` is False). A recipe's first seed also
    exports its LiteRT models, for latency and size.
    """
    plan = list(plan)
    results, missing = [], []
    first_seed: dict[str, int] = {}
    for recipe, seed in plan:
        first_seed.setdefault(recipe.name, seed)
    for position, (recipe, seed) in enumerate(plan, start=1):
        path = run_path(runs_dir, recipe, seed)
        if path.is_file() and not force:
            result = read_json(path)
            if _stored_recipe(result["recipe"]) == recipe:
                progress(f"{position}/{len(plan)} {recipe.name} seed {seed}: done before, kept ({path.name})")
                results.append(result)
                continue
            progress(f"{position}/{len(plan)} {recipe.name} seed {seed}: the recipe changed since; retraining")
        if not train_missing:
            progress(f"{position}/{len(plan)} {recipe.name} seed {seed}: missing, not trained (train_missing=False)")
            missing.append(f"{recipe.name} seed {seed}")
            continue
        progress(f"{position}/{len(plan)} {recipe.name} seed {seed}: training ...")
        started = time.perf_counter()
        exporting = models_dir if seed == first_seed[recipe.name] else None
        checkpoint = Path(runs_dir).parent / "checkpoints" / recipe.name / f"seed{seed}"
        result = run_one(
            recipe, seed, runs_dir=runs_dir, models_dir=exporting, checkpoint_dir=checkpoint, **data_and_settings
        )
        progress(
            f"{position}/{len(plan)} {recipe.name} seed {seed}: test accuracy {result['test']['accuracy']:.4f}, "
            f"loss {result['test']['loss']:.4f} ({time.perf_counter() - started:.0f} s)"
        )
        results.append(result)
    return results, missing


def measure_latency(models_dir: Path, out: Path, runs: int = 1000) -> dict[str, dict]:
    """Time every LiteRT model in ``models_dir`` in a fresh process (no TensorFlow in it).

    The models are not committed, so a fresh clone has the runs and ``out`` but no models: figures
    of models not on disk are kept from ``out``, and those on disk are measured anew.
    """
    import subprocess

    previous = read_json(out) if Path(out).is_file() else {}
    models = sorted(str(path) for path in Path(models_dir).glob("*.tflite"))
    if not models:
        return previous
    command = [sys.executable, "-m", "fmnist", "latency", *models, "--runs", str(runs), "--json", str(out)]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    figures = {**previous, **read_json(out)}
    write_json(out, figures)
    return figures


def plan(
    recipes: dict[str, dict[str, Any]],
    ablations: dict[str, dict[str, Any]],
    ablation_base: str,
    seeds: list[int],
    ablation_seeds: list[int],
    *,
    tuning_result: Path,
) -> tuple[list[tuple[Recipe, int]], list[Recipe], list[Recipe]]:
    """The (recipe, seed) runs to do, main recipes first; ``tuned`` recipes get 02_tune's values."""
    from fmnist.recipes import recipes_from_params
    from fmnist.training import choose_hyperparameters

    for name, values in (("seeds", seeds), ("ablation_seeds", ablation_seeds)):
        if not values or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
            raise ValueError(f"{name}={values!r}: give a non-empty list of non-negative integer seeds.")
    main, varied = recipes_from_params(recipes, ablations, ablation_base)
    if any(recipe.tuned for recipe in [*main, *varied]):
        tuned_values, source = choose_hyperparameters(tuning_result)
        _say(f"tuned recipes use {tuned_values} <- {source}")
        main = [recipe.with_hyperparameters(tuned_values) if recipe.tuned else recipe for recipe in main]
        varied = [recipe.with_hyperparameters(tuned_values) if recipe.tuned else recipe for recipe in varied]
    runs = [(recipe, seed) for recipe in main for seed in seeds]
    runs += [(recipe, seed) for recipe in varied for seed in ablation_seeds]
    return runs, main, varied


def search_hyperparameters(
    recipe: Recipe,
    search_space: dict[str, list],
    *,
    x_train_full: np.ndarray,
    y_train_full: np.ndarray,
    validation_size: int,
    train_subset: int,
    max_epochs: int,
    seed: int,
    out_dir: Path,
    data_checksums: dict[str, str] | None = None,
    workers: int = 0,
) -> dict[str, Any]:
    """Hyperband over ``search_space`` for ``recipe`` on the validation split, or the stored result of the same search.

    Ranked by validation accuracy, not loss: a search over label smoothing
    would otherwise compare losses computed with different smoothing. The
    recipe's schedule runs over ``max_epochs``, the longest any trial trains.
    Trials run through ``fmnist.tuning.search`` (resumable; ``workers`` > 0
    spreads them over worker processes). Writes ``search.json`` (the request,
    the best values, the wall time) and ``search_trials.csv`` in ``out_dir``.
    """
    import dataclasses

    from fmnist import tuning

    request = tuning.SearchRequest(
        recipe=dataclasses.replace(recipe, epochs=max_epochs, patience=0).as_dict(),
        search_space=search_space,
        tuner="hyperband",
        objective="val_accuracy",
        seed=seed,
        validation_size=validation_size,
        train_subset=train_subset,
        data_checksums=data_checksums or {},
    )
    stored_path = Path(out_dir) / "search.json"
    if stored_path.is_file():
        stored = read_json(stored_path)
        if stored.get("request_digest") == request.digest:
            _say(f"search: the same search ran before ({stored['seconds']:.0f} s); reusing {stored['best']}")
            return stored
    _say(f"search: Hyperband over {search_space} for {recipe.name}, up to {max_epochs} epochs")
    found = tuning.search(request, x_train_full, y_train_full, directory=Path(out_dir) / "keras_tuner", workers=workers)
    with atomic_path(Path(out_dir) / "search_trials.csv") as temporary:
        found.trials.to_csv(temporary, index=False)
    result = {
        "request": json.loads(request.to_json()),
        "request_digest": request.digest,
        "best": found.best,
        "seconds": found.stats["wall_seconds"],
        "trials": len(found.trials),
        "stats": found.stats,
    }
    write_json(stored_path, result)
    return result
