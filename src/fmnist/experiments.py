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

from fmnist.config import ExperimentsLayout
from fmnist.data import tta_view_count, tta_views
from fmnist.io import atomic_path, read_json, write_json
from fmnist.manifest import describe_machine
from fmnist.recipes import EVALUATION_FIELDS, Recipe
from fmnist.results import training_tflops
from fmnist.runs import file_digest
from fmnist.runtime import quiet_tensorflow

quiet_tensorflow()

import keras  # noqa: E402

from fmnist import evaluation  # noqa: E402
from fmnist.training import TensorBoard, discard_checkpoint, fit, training_code_version  # noqa: E402


def _say(message: str) -> None:
    print(f"[experiments] {message}", file=sys.stderr, flush=True)


def predict(model: keras.Model, images: np.ndarray, shifts: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities without and with TTA: the mean over the image, its mirror image and, with
    ``shifts`` (a recipe's ``tta_shifts``), the four shifted views and their mirror images."""
    views = tta_views(images, shifts)
    plain = model.predict(views[0], batch_size=1000, verbose=0)
    total = plain + model.predict(views[1], batch_size=1000, verbose=0)
    for view in views[2:]:
        total += model.predict(view, batch_size=1000, verbose=0)
    return plain, total / len(views)


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


def tensorboard_path(tensorboard_dir: Path, recipe_name: str, seed: int) -> Path:
    """Where a run's TensorBoard log goes: one directory per (recipe, seed), so the curves compare side by side."""
    return Path(tensorboard_dir) / f"{recipe_name}_seed{seed}"


def distillation_targets(teacher: keras.Model, images: np.ndarray, labels: np.ndarray, recipe: Recipe) -> np.ndarray:
    """The rows a distilled recipe trains on: the teacher's softened probabilities mixed with the labels.

    The teacher's probabilities, averaged with its mirror image's (flip TTA;
    not the shifted views of the teacher recipe's ``tta_shifts``, so a teacher
    evaluated again teaches the same), are raised to 1/temperature and renormalised: the softmax of its logits
    divided by the temperature. ``teacher_weight`` of each row comes from them,
    the rest from the one-hot label. Computed once on the unaugmented training
    images: flips and small shifts do not change what an image shows.
    """
    from fmnist.training import one_hot

    _, mirrored = predict(teacher, images)
    probabilities = np.clip(mirrored, 1e-12, 1.0).astype(np.float64)
    softened = probabilities ** (1.0 / recipe.temperature)
    softened /= softened.sum(axis=1, keepdims=True)
    targets = recipe.teacher_weight * softened + (1.0 - recipe.teacher_weight) * one_hot(labels)
    return targets.astype(np.float32)


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
    files: ExperimentsLayout,
    export: bool = False,
    checkpoint_dir: Path | None = None,
    tensorboard_dir: Path | None = None,
    verbose: int = 2,
) -> dict[str, Any]:
    """Train and evaluate one recipe with one seed; write its result, its Keras model and, with ``export``,
    its LiteRT models into ``files.models`` (the result into ``files.runs``).

    With ``checkpoint_dir`` a killed run resumes at its last complete epoch. With ``tensorboard_dir``
    the training logs its epochs to ``<tensorboard_dir>/<recipe>_seed<N>/``.
    """
    from fmnist import data

    if recipe.quantisation_aware_epochs:
        from fmnist import quantisation
        from fmnist.model import build_network

        # Refuse before the training, not after it.
        network = build_network(recipe.architecture, dropout_rate=recipe.dropout_rate, **recipe.network_options())
        quantisation.require_quantised_layers(
            network, f"recipe {recipe.name!r} (quantisation_aware_epochs={recipe.quantisation_aware_epochs})"
        )
    x_train, y_train, x_val, y_val = data.train_validation_split(x_train_full, y_train_full, validation_size, seed)
    # The images its int8 file's agreement with the Keras model is measured on besides the test images.
    x_agreement = x_val
    if recipe.final_fit:
        # The final fit trains on every training image: its settings were judged on another recipe's validation
        # split, and nothing is chosen on this run, so it has none. (Its file's agreement is still measured on
        # the split's validation images, seen in training: agreement is not accuracy.)
        x_train, y_train, x_val, y_val = x_train_full, y_train_full, None, None
    x_train, y_train = data.stratified_subset(x_train, y_train, train_subset, seed)
    targets = y_train
    teacher_record = None
    if recipe.teacher:
        # The teacher's run with the same seed saw the same training images: the same split, or for a final fit all
        # of them (fmnist.recipes requires a final fit's teacher to be a final fit). The validation images stay
        # unseen by both, or are seen by both.
        teacher_file = files.model(recipe.teacher, seed)
        if not teacher_file.is_file():
            raise FileNotFoundError(
                f"{recipe.name} seed {seed} distils {recipe.teacher!r}, whose model {teacher_file} is not on disk "
                f"(models are not committed). Retrain the teacher: delete runs/{recipe.teacher}/seed{seed}.json "
                "and rerun, or train it in the same run by listing it before its students."
            )
        teacher = keras.models.load_model(teacher_file)
        targets = distillation_targets(teacher, x_train, y_train, recipe)
        teacher_run = read_json(files.run(recipe.teacher, seed))
        # The student's compute includes its teacher's: the teacher's training, then two predictions per image.
        inference_flops = 2 * 2 * teacher_run["multiply_adds"] * len(y_train)
        teacher_record = {
            "recipe": recipe.teacher,
            "model": teacher_file.name,
            "seed": seed,
            "run_sha256": file_digest(files.run(recipe.teacher, seed)),
            "tflops": training_tflops(teacher_run) + inference_flops / 1e12,
        }
    callbacks = [] if tensorboard_dir is None else [TensorBoard(tensorboard_path(tensorboard_dir, recipe.name, seed))]
    fitted = fit(
        recipe,
        x_train,
        targets,
        x_val,
        y_val,
        seed=seed,
        checkpoint_dir=checkpoint_dir,
        callbacks=callbacks,
        verbose=verbose,
    )
    quantisation_aware = None
    if recipe.quantisation_aware_epochs:
        # The float32 network's validation figures before the fine-tuning (the training's own were in its precision).
        before = None if x_val is None else scores(y_val, fitted.model.predict(x_val, batch_size=1000, verbose=0))
        quantisation_aware = quantisation_aware_fine_tune(fitted.model, x_train, y_train, recipe, seed)
        quantisation_aware["validation_before"] = (
            None if before is None else {"accuracy": before["accuracy"], "loss": before["loss"]}
        )
    validation_plain, plain, evaluation = evaluate(fitted.model, recipe, x_val, y_val, x_test, y_test)
    result = {
        **fitted.summary(recipe, len(y_train)),
        "seed": seed,
        # Stored runs are kept while their recipe is unchanged; this says which training code made them.
        "training_code": training_code_version(),
        "machine": describe_machine(),
        **evaluation,
        "history": fitted.history,
        "teacher": teacher_record,
        # The split it trained and was judged on: a run of another split is not kept (run_all).
        "split": {"validation_size": validation_size, "train_subset": train_subset, "final_fit": recipe.final_fit},
        "quantisation_aware": quantisation_aware,
    }
    if quantisation_aware is not None and x_val is not None:
        # The model now is the fine-tuned one: its validation figures replace the training's last epoch's.
        validation = scores(y_val, validation_plain)
        result["validation"] = {"accuracy": validation["accuracy"], "loss": validation["loss"]}
    if export:
        agreement_plain = (
            validation_plain if x_val is not None else fitted.model.predict(x_agreement, batch_size=1000, verbose=0)
        )
        result.update(
            export_litert(fitted.model, files, recipe.name, x_test, y_test, plain, x_agreement, agreement_plain)
        )
    with atomic_path(files.model(recipe.name, seed)) as temporary:
        fitted.model.save(temporary)
    write_json(files.run(recipe.name, seed), result)
    if checkpoint_dir is not None:
        discard_checkpoint(checkpoint_dir)
    return result


def evaluate(
    model: keras.Model, recipe: Recipe, x_val: np.ndarray, y_val: np.ndarray, x_test: np.ndarray, y_test: np.ndarray
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """What a run records of its model's predictions, with and without the recipe's TTA; and the validation
    and test probabilities without TTA (for the export's checks).

    Whether TTA helps is read on validation (``validation_tta``), never from the test columns. A final fit has
    no validation images (``x_val`` None): its ``validation_tta`` and validation probabilities are None.
    """
    validation_plain, validation_tta = predict(model, x_val, recipe.tta_shifts) if x_val is not None else (None, None)
    plain, with_tta = predict(model, x_test, recipe.tta_shifts)
    return (
        validation_plain,
        plain,
        {
            "validation_tta": None
            if x_val is None
            else {
                "accuracy_without": float(np.mean(validation_plain.argmax(axis=1) == y_val)),
                "accuracy_with": float(np.mean(validation_tta.argmax(axis=1) == y_val)),
                "views": tta_view_count(recipe.tta_shifts),
            },
            "test": scores(y_test, with_tta if recipe.tta else plain),
            "test_without_tta": scores(y_test, plain),
            "test_with_tta": scores(y_test, with_tta),
        },
    )


# The training images whose activations set the channel equalisation before quantisation-aware fine-tuning.
EQUALISATION_IMAGES = 5000


def quantisation_aware_fine_tune(
    model: keras.Model,
    x_train: np.ndarray,
    y_train: np.ndarray,
    recipe: Recipe,
    seed: int,
) -> dict[str, Any]:
    """The recipe's quantisation-aware epochs on a trained model (:func:`fmnist.quantisation.fine_tune`), on the
    same training images and augmentation as its training, and their labels; what the run records of them.

    The labels, not a distilled recipe's teacher targets: on seed 42's validation split, fine-tuning the
    distilled network on its teacher's targets lost 0.25-0.5 points more accuracy than the same fine-tuning
    on the labels (which lost 0-0.2). Each
    step runs the network twice (float, and as int8 serves it), so an epoch counts twice a training epoch's
    compute.
    """
    import dataclasses

    from fmnist import quantisation, training
    from fmnist.model import multiply_adds

    epochs = recipe.quantisation_aware_epochs
    # First give every channel the same range, so that rounding each layer's input per image spares the weak ones.
    equalised = quantisation.equalise_channels(model, x_train[:EQUALISATION_IMAGES])
    # Every image in every fine-tuning epoch, a hard-image recipe's too.
    batches = training.training_dataset(
        x_train, y_train, dataclasses.replace(recipe, epochs=epochs, warmup_epochs=0, hard_share=0.0), seed
    )
    history = quantisation.fine_tune(
        model,
        batches,
        steps_per_epoch=training.steps_per_epoch(len(x_train), recipe.batch_size),
        epochs=epochs,
        learning_rate=recipe.quantisation_aware_learning_rate,
        consistency_weight=recipe.consistency_weight,
        say=lambda message: print(f"[train] {message}", file=sys.stderr, flush=True),
    )
    flops = 2 * 6 * multiply_adds(model) * len(x_train) * epochs
    return {
        "epochs": epochs,
        "learning_rate": recipe.quantisation_aware_learning_rate,
        "consistency_weight": recipe.consistency_weight,
        "equalised": equalised,
        "history": history,
        "code": quantisation.fine_tuning_code_version(),
        "flops": flops,
        "tflops": round(flops / 1e12, 3),
    }


def export_litert(
    model: keras.Model,
    files: ExperimentsLayout,
    name: str,
    x_test: np.ndarray,
    y_test: np.ndarray,
    keras_probabilities: np.ndarray,
    x_val: np.ndarray,
    validation_probabilities: np.ndarray,
) -> dict[str, Any]:
    """float32 and int8 LiteRT files of a trained model (for the latency and size columns, and the shipping
    rule), with what a run records of them: the files, their SHA-256, the export scheme, and how each file
    serves: its test accuracy and its distance from the Keras model's probabilities (no TTA) on the test
    images (``keras_probabilities``) and on the validation images (``validation_probabilities``, which the
    shipping rule reads).
    """
    from fmnist import deploy, export

    written = {
        "float32": export.write_model(export.to_float32(model), files.litert_model(name, "float32")),
        "int8": export.write_model(export.to_int8(model), files.litert_model(name, "int8")),
    }
    served = {}
    for kind, path in written.items():
        served[kind] = deploy.served_figures(path, x_test, y_test, keras_probabilities)
        served[kind]["validation_probability_difference"] = deploy.probability_agreement(
            path, x_val, validation_probabilities
        )
    return {
        "litert_files": {kind: path.name for kind, path in written.items()},
        # Which run a file on disk came from: the shipping rule checks it before it trusts the run's figures.
        "litert_sha256": {kind: file_digest(path) for kind, path in written.items()},
        "litert_export": export.EXPORT_SCHEME,
        "litert_served": served,
    }


def refresh_export(
    result: dict[str, Any],
    recipe: Recipe,
    seed: int,
    files: ExperimentsLayout,
    x_test: np.ndarray | None,
    y_test: np.ndarray | None,
    validation_split: Callable[[int], tuple[np.ndarray, np.ndarray]] | None = None,
) -> str | None:
    """Re-export a kept run whose LiteRT files came from an older export scheme, or whose record lacks how
    they serve on the validation images, when its model is on disk.

    The training stays as it was; the files are rewritten, with what the run records of them (their digests,
    the scheme and how they serve: :func:`export_litert`). ``validation_split(seed)`` gives the run's
    validation split. Returns None when the files were written, else why not ("" when there is nothing to
    say: the files are current, or none was exported, or none is on disk to be stale).
    """
    from fmnist import export

    exported = (result.get("litert_files") or {}).values()
    served = ((result.get("litert_served") or {}).get("int8") or {}).get("validation_probability_difference")
    current = result.get("litert_export") == export.EXPORT_SCHEME and served is not None
    if current or not any((files.models / name).is_file() for name in exported):
        return ""
    model_file = files.model(recipe.name, seed)
    if not model_file.is_file():
        return (
            f"its model {model_file.name} is not on disk (models are not committed), so its files cannot be "
            "rewritten or measured again"
        )
    if x_test is None or y_test is None or validation_split is None:
        return "no test or validation images were given to measure the new files on"
    model = keras.models.load_model(model_file)
    x_val, _ = validation_split(seed)
    result.update(
        export_litert(
            model,
            files,
            recipe.name,
            x_test,
            y_test,
            model.predict(x_test, batch_size=1000, verbose=0),
            x_val,
            model.predict(x_val, batch_size=1000, verbose=0),
        )
    )
    write_json(files.run(recipe.name, seed), result)
    return None


def _keep(
    label: str,
    recipe: Recipe,
    seed: int,
    result: dict[str, Any],
    *,
    re_point_teacher: str | None,
    refresh: bool,
    files: ExperimentsLayout,
    x_test: np.ndarray | None,
    y_test: np.ndarray | None,
    validation_split: Callable[[int], tuple[np.ndarray, np.ndarray]] | None,
    progress: Callable[[str], None],
    evaluate_again: bool = False,
) -> None:
    """Keep a stored run: point it at its teacher's rewritten run file (``re_point_teacher``, that file's
    SHA-256 now); with ``evaluate_again``, evaluate its model on disk as ``recipe`` says (the recipe changed
    only in ``EVALUATION_FIELDS``); and, with ``refresh``, re-export it under the current scheme
    (:func:`refresh_export`).

    A student names the teacher run it learnt from by that file's SHA-256. A re-export or a new evaluation
    rewrites the file but not the training (a student's targets are the teacher model's flip-averaged
    probabilities, whatever its recipe's evaluation), so a rewritten file lists the digests it had before
    (``rewritten_from``): a student of such a teacher is re-pointed instead of retrained, even by a later
    run when this one stopped before reaching it.
    """
    path = files.run(recipe.name, seed)
    before = file_digest(path)
    if re_point_teacher is not None:
        result["teacher"]["run_sha256"] = re_point_teacher
        if refresh:  # train_missing=False writes nothing.
            write_json(path, result)
        progress(f"{label}: its teacher's run was rewritten, not retrained; the same training, so it is kept")
    if evaluate_again:
        stored = _stored_recipe(result["recipe"])
        changes = ", ".join(
            f"{name} {getattr(stored, name)} -> {getattr(recipe, name)}"
            for name in EVALUATION_FIELDS
            if getattr(stored, name) != getattr(recipe, name)
        )
        if stored.tta_shifts != recipe.tta_shifts:
            # Other views: the model on disk is evaluated with them. (Toggling tta alone needs no model: the
            # run recorded its figures both with and without its TTA.)
            # A final fit trained on the validation split: it has no validation figures to evaluate again.
            x_val, y_val = (None, None) if recipe.final_fit else validation_split(seed)
            model = keras.models.load_model(files.model(recipe.name, seed))
            fresh = evaluate(model, recipe, x_val, y_val, x_test, y_test)[2]
            # Only the figures with TTA change: those without it stay as the run recorded them.
            stored_tta = result.get("validation_tta") or {}
            result["validation_tta"] = fresh["validation_tta"] and {
                **fresh["validation_tta"],
                **{k: v for k, v in stored_tta.items() if k != "accuracy_with" and k != "views"},
            }
            result["test_with_tta"] = fresh["test_with_tta"]
            result.setdefault("test_without_tta", fresh["test_without_tta"])
        result["test"] = result["test_with_tta"] if recipe.tta else result["test_without_tta"]
        result["recipe"] = recipe.as_dict()
        write_json(path, result)
        progress(f"{label}: evaluated again ({changes}); the same training, so it is kept")
    why_not = refresh_export(result, recipe, seed, files, x_test, y_test, validation_split) if refresh else ""
    if why_not is None:
        progress(f"{label}: re-exported (new export scheme, or served figures on the validation images added)")
    elif why_not:
        progress(f"{label}: old export kept: {why_not}")
    if file_digest(path) != before:
        result["rewritten_from"] = [*result.get("rewritten_from", []), before]
        write_json(path, result)


def _other_split(result: dict[str, Any], data_and_settings: dict[str, Any]) -> str:
    """How a stored run's split differs from this run's settings ("" when it does not, or is not known: runs
    recorded before the split was, and calls without the settings, are taken to match)."""
    stored = result.get("split") or {}
    changed = [
        f"{name} {stored[name]} -> {data_and_settings[name]}"
        for name in ("validation_size", "train_subset")
        if name in stored and data_and_settings.get(name) is not None and stored[name] != data_and_settings[name]
    ]
    return ", ".join(changed)


def _validation_split(data_and_settings: dict[str, Any]) -> Callable[[int], tuple[np.ndarray, np.ndarray]] | None:
    """The validation images and labels of a seed's split, as :func:`run_one` draws it, when the training images
    are given."""
    from fmnist import data

    if data_and_settings.get("x_train_full") is None or data_and_settings.get("y_train_full") is None:
        return None

    def split(seed: int) -> tuple[np.ndarray, np.ndarray]:
        _, _, x_val, y_val = data.train_validation_split(
            data_and_settings["x_train_full"],
            data_and_settings["y_train_full"],
            data_and_settings["validation_size"],
            seed,
        )
        return x_val, y_val

    return split


def _stored_recipe(values: dict[str, Any]) -> Recipe | None:
    """The recipe a stored run was trained with; fields added since take their defaults (the old behaviour)."""
    try:
        return Recipe(**values)
    except (TypeError, ValueError):
        return None


def run_all(
    plan: Iterable[tuple[Recipe, int]],
    *,
    files: ExperimentsLayout,
    train_missing: bool = True,
    force: bool = False,
    progress: Callable[[str], None] = _say,
    tensorboard_dir: Path | None = None,
    **data_and_settings: Any,
) -> tuple[list[dict[str, Any]], list[str]]:
    """Run every (recipe, seed) of ``plan`` that has no result yet.

    Returns the results in plan order and the runs still missing (those not
    trained because ``train_missing`` is False). A recipe's first seed also
    exports its LiteRT models, for latency and size. Each training logs to
    ``<tensorboard_dir>/<recipe>_seed<N>/`` when ``tensorboard_dir`` is given
    (a kept run keeps the log it has).
    """
    plan = list(plan)
    results, missing = [], []
    validation_split = _validation_split(data_and_settings)
    images_given = validation_split is not None and all(
        data_and_settings.get(name) is not None for name in ("x_test", "y_test")
    )
    first_seed: dict[str, int] = {}
    for recipe, seed in plan:
        first_seed.setdefault(recipe.name, seed)
    for position, (recipe, seed) in enumerate(plan, start=1):
        label = f"{position}/{len(plan)} {recipe.name} seed {seed}"
        path = files.run(recipe.name, seed)
        if path.is_file() and not force:
            result = read_json(path)
            recorded = (result.get("teacher") or {}).get("run_sha256")
            teacher_path = files.run(recipe.teacher, seed) if recipe.teacher else None
            current = _sha_or_none(teacher_path) if teacher_path else None
            # A teacher's file rewritten without retraining (re-exported, evaluated again) lists its old digests.
            re_pointed = (
                bool(recipe.teacher)
                and current is not None
                and recorded != current
                and recorded in read_json(teacher_path).get("rewritten_from", [])
            )
            stale_teacher = bool(recipe.teacher) and recorded != current and not re_pointed
            other_split = _other_split(result, data_and_settings)
            stored = _stored_recipe(result["recipe"])
            # A recipe changed only in how its model is evaluated is evaluated again, when it can be.
            evaluation_only = stored is not None and stored != recipe and stored.evaluated_as(recipe) == recipe
            model_on_disk = files.model(recipe.name, seed).is_file()
            # Toggling tta alone picks the other recorded figures; other views need the model and the images.
            toggled = evaluation_only and stored.tta_shifts == recipe.tta_shifts and "test_with_tta" in result
            evaluate_again = evaluation_only and train_missing and (toggled or (model_on_disk and images_given))
            # train_missing=False writes nothing: such a run is summarised with the evaluation it recorded.
            as_recorded = evaluation_only and not train_missing
            if (stored == recipe or evaluate_again or as_recorded) and not stale_teacher and not other_split:
                progress(f"{label}: done before, kept ({path.name})")
                if as_recorded:
                    progress(f"{label}: its evaluation changed; summarised as recorded (train_missing=False)")
                _keep(
                    label,
                    recipe,
                    seed,
                    result,
                    re_point_teacher=current if re_pointed else None,
                    # train_missing=False writes nothing: it summarises what is on disk.
                    refresh=train_missing,
                    files=files,
                    x_test=data_and_settings.get("x_test"),
                    y_test=data_and_settings.get("y_test"),
                    validation_split=validation_split,
                    evaluate_again=evaluate_again,
                    progress=progress,
                )
                results.append(result)
                continue
            if other_split:
                reason = f"the split changed ({other_split})"
            elif stale_teacher:
                reason = "its teacher was retrained"
            elif evaluation_only and not model_on_disk:
                reason = "its evaluation changed and its model is not on disk to evaluate again"
            elif evaluation_only:
                reason = "its evaluation changed and no test and validation images were given to evaluate it on"
            else:
                reason = "the recipe changed"
            progress(f"{label}: {reason} since; retraining")
        if not train_missing:
            progress(f"{position}/{len(plan)} {recipe.name} seed {seed}: missing, not trained (train_missing=False)")
            missing.append(f"{recipe.name} seed {seed}")
            continue
        if recipe.teacher and not files.model(recipe.teacher, seed).is_file():
            # Models are not committed: a kept teacher run has no model on a fresh clone, so retrain it first.
            teacher = next(other for other, other_seed in plan if other.name == recipe.teacher)
            progress(f"{position}/{len(plan)} {recipe.teacher} seed {seed}: retraining the teacher (no model on disk)")
            retrained = run_one(
                teacher,
                seed,
                files=files,
                export=seed == first_seed[teacher.name],
                checkpoint_dir=files.checkpoint(teacher.name, seed),
                tensorboard_dir=tensorboard_dir,
                **data_and_settings,
            )
            results = [r for r in results if (r["recipe"]["name"], r["seed"]) != (teacher.name, seed)] + [retrained]
        progress(f"{position}/{len(plan)} {recipe.name} seed {seed}: training ...")
        started = time.perf_counter()
        result = run_one(
            recipe,
            seed,
            files=files,
            export=seed == first_seed[recipe.name],
            checkpoint_dir=files.checkpoint(recipe.name, seed),
            tensorboard_dir=tensorboard_dir,
            **data_and_settings,
        )
        progress(
            f"{position}/{len(plan)} {recipe.name} seed {seed}: test accuracy {result['test']['accuracy']:.4f}, "
            f"loss {result['test']['loss']:.4f} ({time.perf_counter() - started:.0f} s)"
        )
        results.append(result)
    return results, missing


def measure_latency(files: ExperimentsLayout, runs: int = 1000) -> dict[str, dict]:
    """Time every LiteRT model in ``files.models`` in a fresh process (no TensorFlow in it), into ``files.latency``.

    The models are not committed, so a fresh clone has the runs and the latency file but no models: figures
    of models not on disk are kept from the file, and those on disk are measured anew.
    """
    from fmnist.deploy import latency_process

    previous = read_json(files.latency) if files.latency.is_file() else {}
    models = sorted(files.models.glob("*.tflite"))
    if not models:
        return previous
    figures = {**previous, **latency_process(models, runs, files.latency)}
    write_json(files.latency, figures)
    return figures


def _sha_or_none(path: Path) -> str | None:
    return file_digest(path) if Path(path).is_file() else None


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
    files: ExperimentsLayout,
    data_checksums: dict[str, str] | None = None,
    workers: int = 0,
    tensorboard_dir: Path | None = None,
) -> dict[str, Any]:
    """Hyperband over ``search_space`` for ``recipe`` on the validation split, or the stored result of the same search.

    Ranked by validation accuracy, not loss: a search over label smoothing
    would otherwise compare losses computed with different smoothing. The
    recipe's schedule runs over ``max_epochs``, the longest any trial trains.
    Trials run through ``fmnist.tuning.search`` (resumable; ``workers`` > 0
    spreads them over worker processes). Writes ``files.search`` (the request,
    the best values, the wall time) and ``files.search_trials``;
    with ``tensorboard_dir``, each trial's TensorBoard log and hyperparameters.
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
    stored_path = files.search
    if stored_path.is_file():
        stored = read_json(stored_path)
        if stored.get("request_digest") == request.digest:
            _say(f"search: the same search ran before ({stored['seconds']:.0f} s); reusing {stored['best']}")
            return stored
    _say(f"search: Hyperband over {search_space} for {recipe.name}, up to {max_epochs} epochs")
    found = tuning.search(
        request,
        x_train_full,
        y_train_full,
        directory=files.tuner_dir,
        workers=workers,
        tensorboard_dir=tensorboard_dir,
    )
    with atomic_path(files.search_trials) as temporary:
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


class StepTimer(keras.callbacks.Callback):
    """The wall time between consecutive training steps' ends: what one step costs, input pipeline included."""

    def on_train_begin(self, logs=None):
        self.intervals: list[float] = []
        self._last: float | None = None

    def on_train_batch_end(self, batch, logs=None):
        now = time.perf_counter()
        if self._last is not None:
            self.intervals.append(now - self._last)
        self._last = now


def augmentation_ms(recipe: Recipe, images: np.ndarray, *, calls: int = 100, blocks: int = 5) -> float:
    """What the recipe's augmentation of one batch costs on its own, in milliseconds: ``training.augment_batch``
    compiled as the input pipeline runs it, on one batch of ``images``, timed in ``blocks`` blocks of ``calls``
    calls; the median of the blocks' means. 0 for a recipe that does not augment."""
    import tensorflow as tf

    from fmnist.training import augment_batch

    if not recipe.augments:
        return 0.0
    batch = tf.constant(images[: recipe.batch_size])
    augment = tf.function(lambda step: augment_batch(batch, recipe, tf.stack([tf.constant(0, tf.int64), step])))
    augment(tf.constant(0, tf.int64))  # Traced outside the timing.
    means = []
    for block in range(blocks):
        started = time.perf_counter()
        for call in range(calls):
            augment(tf.constant(block * calls + call, tf.int64))
        means.append((time.perf_counter() - started) / calls)
    return float(np.median(means) * 1e3)


def measure_throughput(
    recipe: Recipe, images: np.ndarray, labels: np.ndarray, *, steps: int = 60, rounds: int = 3
) -> dict[str, Any]:
    """Training speed of ``recipe`` here: float32 against bfloat16 (where native), with and without augmentation.

    Each configuration trains 20 untimed steps (tracing, warm-up), then ``steps`` timed ones in the
    same call, through the real input pipeline (``training.training_dataset``). A step's time is the
    median interval between steps, so a passing stall does not count; the configurations take turns
    over ``rounds`` rounds and each keeps its fastest round, so none is favoured by when it ran. The
    augmentation's share of a step is 1 - (step time without augmentation) / (step time with it).

    That difference of two step times is noisy on a shared machine (it has read 0 % and 12 % in one run), so the
    augmentation is also timed on its own (:func:`augmentation_ms`): its ``<precision>_augmentation_cost_share``
    is that time over the augmented step's. tf.data runs it beside the step, so it slows the step by at most that.
    """
    import dataclasses

    from fmnist import training
    from fmnist.manifest import machine
    from fmnist.model import multiply_adds

    if steps < 1 or rounds < 1:
        raise ValueError(f"steps={steps}, rounds={rounds}: time at least one step in at least one round.")
    warmup = 20
    precisions = ["float32"] + (["bfloat16"] if machine()["auto_precision"] == "bfloat16" else [])
    variants = {
        "augmented": recipe,
        "plain": dataclasses.replace(recipe, shift_pixels=0, horizontal_flip=False, erasing=0.0),
    }
    figures: dict[str, Any] = {
        "recipe": recipe.name,
        "steps": steps,
        "rounds": rounds,
        "batch_size": recipe.batch_size,
        "runs": {},
    }
    medians: dict[str, list[float]] = {}
    flops_per_step: dict[str, float] = {}
    for _ in range(rounds):
        for precision in precisions:
            for kind, variant in variants.items():
                # One epoch is enough to time steps; a warm-up must be shorter than the epochs, so none. A hard-image
                # recipe's step is the same network's (its loss record aside), timed on plain epochs.
                variant = dataclasses.replace(variant, precision=precision, epochs=1, warmup_epochs=0, hard_share=0.0)
                model = training.build(variant, len(labels), seed=0)
                data = training.training_dataset(images, labels, variant, seed=0).repeat()
                timer = StepTimer()
                model.fit(data, steps_per_epoch=warmup + steps, epochs=1, verbose=0, shuffle=False, callbacks=[timer])
                name = f"{precision}_{kind}"
                medians.setdefault(name, []).append(float(np.median(timer.intervals[warmup - 1 :])))
                flops_per_step[name] = 6 * multiply_adds(model) * recipe.batch_size
    for name, values in medians.items():
        seconds = min(values)
        figures["runs"][name] = {
            "step_ms": seconds * 1e3,
            "step_ms_rounds": [round(value * 1e3, 3) for value in values],
            "images_per_second": recipe.batch_size / seconds,
            "gflops": flops_per_step[name] / seconds / 1e9,
        }
    runs = figures["runs"]
    for precision in precisions:
        with_it, without = runs[f"{precision}_augmented"]["step_ms"], runs[f"{precision}_plain"]["step_ms"]
        figures[f"{precision}_augmentation_share"] = max(0.0, 1 - without / with_it)
    figures["augmentation_ms"] = augmentation_ms(recipe, images)
    for precision in precisions:
        figures[f"{precision}_augmentation_cost_share"] = (
            figures["augmentation_ms"] / runs[f"{precision}_augmented"]["step_ms"]
        )
    if "bfloat16" in precisions:
        figures["bfloat16_speedup"] = runs["float32_augmented"]["step_ms"] / runs["bfloat16_augmented"]["step_ms"]
    figures["machine"] = describe_machine()
    return figures


# What a retraining must reproduce to count as the same run: everything it computes, not how long it took.
REPRODUCED_FIELDS = ("history", "validation", "validation_tta", "test", "test_without_tta", "test_with_tta")


def _without_times(value: Any) -> Any:
    """``value`` without its ``epoch_seconds`` entries (the one thing a faithful retraining changes)."""
    if isinstance(value, dict):
        return {key: _without_times(item) for key, item in value.items() if key != "epoch_seconds"}
    if isinstance(value, list):
        return [_without_times(item) for item in value]
    return value


def verify_run(
    name: str,
    seed: int,
    *,
    files: ExperimentsLayout,
    scratch: Path,
    x_train_full: np.ndarray,
    y_train_full: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    split: dict[str, int] | None = None,
    restore: bool = False,
    verbose: int = 0,
) -> dict[str, Any]:
    """Retrain a stored run with the code here, in ``scratch``, and compare what it computes with what the run
    recorded (its history, validation and test figures, and its fine-tuning's history: ``REPRODUCED_FIELDS``).

    The stored run, and the teacher's run and model for a distilled recipe, are only read. ``split``
    (``validation_size``, ``train_subset``) is for runs recorded before they recorded their own. Returns a record
    of the check: which code and machine retrained it, whether every figure came out identical, and which differ.

    With ``restore``, a run that reproduced exactly and whose model is not in ``files.models`` (models are not
    committed) gets the retrained model there: the same network its figures describe, so its students can be
    trained, or it evaluated again, without retraining it. A model already there is never replaced.
    """
    stored_path = files.run(name, seed)
    if not stored_path.is_file():
        raise FileNotFoundError(f"no stored run {stored_path}: name a recipe and seed that 06_experiments trained.")
    stored = read_json(stored_path)
    stored_digest = file_digest(stored_path)
    recipe = _stored_recipe(stored["recipe"])
    if recipe is None:
        raise ValueError(f"{stored_path}: its recipe is not one this code can build, so it cannot be retrained here.")
    recorded_split = stored.get("split")
    split = recorded_split or split
    if not split:
        raise ValueError(
            f"{stored_path} does not record its split: give the validation_size and train_subset it was trained with."
        )
    retrained = ExperimentsLayout(scratch)
    if recipe.teacher:
        teacher_model = files.model(recipe.teacher, seed)
        if not teacher_model.is_file():
            raise FileNotFoundError(
                f"{name} seed {seed} distils {recipe.teacher!r}, whose model {teacher_model} "
                "is not on disk (models are not committed): retrain the teacher first."
            )
        import shutil

        retrained.models.mkdir(parents=True, exist_ok=True)
        shutil.copy2(teacher_model, retrained.model(recipe.teacher, seed))
        teacher_run = retrained.run(recipe.teacher, seed)
        teacher_run.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(files.run(recipe.teacher, seed), teacher_run)
    started = time.perf_counter()
    again = run_one(
        recipe,
        seed,
        x_train_full=x_train_full,
        y_train_full=y_train_full,
        x_test=x_test,
        y_test=y_test,
        validation_size=split["validation_size"],
        train_subset=split["train_subset"],
        files=retrained,
        verbose=verbose,
    )
    compared = {
        field: _without_times(again.get(field)) == _without_times(stored[field])
        for field in REPRODUCED_FIELDS
        if field in stored
    }
    if stored.get("quantisation_aware"):
        # Its code digest may differ while what it computed does not: compare its history and figures only.
        compared["quantisation_aware"] = all(
            _without_times((again.get("quantisation_aware") or {}).get(key))
            == _without_times(stored["quantisation_aware"].get(key))
            for key in ("history", "validation_before", "equalised")
        )
    identical = all(compared.values())
    restored = None
    if restore and identical:
        stored_model = files.model(name, seed)
        if not stored_model.exists():
            import shutil

            with atomic_path(stored_model) as temporary:
                shutil.copyfile(retrained.model(name, seed), temporary)
            restored = stored_model.name
    return {
        "recipe": name,
        "seed": seed,
        # The check holds for this run file only: a run retrained since is not vouched for.
        "run_sha256": stored_digest,
        # Its file name in ``files.models`` (None: nothing restored), as a teacher's model is named in a run.
        "restored_model": restored,
        "stored_training_code": stored.get("training_code"),
        "training_code": again["training_code"],
        "fine_tuning_code": (again.get("quantisation_aware") or {}).get("code"),
        "stored_machine": stored.get("machine"),
        "machine": again["machine"],
        "precision": {"stored": stored.get("precision"), "again": again.get("precision")},
        "split": {**split, "recorded": bool(recorded_split)},
        "identical": identical,
        "differences": sorted(field for field, same in compared.items() if not same),
        "test_accuracy": {"stored": stored["test"]["accuracy"], "again": again["test"]["accuracy"]},
        "minutes": round((time.perf_counter() - started) / 60, 1),
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
    }
