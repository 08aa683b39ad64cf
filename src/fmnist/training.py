"""Train a recipe (the study's model is the seed CNN's), with early stopping on validation; save atomically."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fmnist.config import NUM_CLASSES, SEED_HYPERPARAMETERS
from fmnist.io import atomic_path, read_json
from fmnist.recipes import Recipe
from fmnist.runtime import quiet_tensorflow, set_seed

quiet_tensorflow()

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402
from keras import layers  # noqa: E402

from fmnist.model import build_network  # noqa: E402


def choose_hyperparameters(best_hyperparameters_file: Path) -> tuple[dict[str, float | int], str]:
    """The tuning stage's best values or, when it has not run, the seed's chosen values.

    Returns the hyperparameters and where they came from, for the report.
    """
    if best_hyperparameters_file.is_file():
        values = read_json(best_hyperparameters_file)
        unknown = set(values) - set(SEED_HYPERPARAMETERS)
        missing = set(SEED_HYPERPARAMETERS) - set(values)
        if unknown or missing:
            raise ValueError(
                f"{best_hyperparameters_file}: expected keys {sorted(SEED_HYPERPARAMETERS)}, "
                f"missing {sorted(missing)}, unknown {sorted(unknown)}. Rerun the 02_tune stage."
            )
        return values, f"tuning result ({best_hyperparameters_file.name})"
    return dict(SEED_HYPERPARAMETERS), "fallback: the seed's selected values (no tuning result found)"


class EpochTimer(keras.callbacks.Callback):
    """Record each epoch's wall time in the history."""

    def on_epoch_begin(self, epoch, logs=None):
        self._started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["epoch_seconds"] = time.perf_counter() - self._started


def augmenter(recipe: Recipe, seed: int) -> keras.Sequential | None:
    """The recipe's training-time augmentation as Keras preprocessing layers (None when it has none)."""
    steps = []
    if recipe.horizontal_flip:
        steps.append(layers.RandomFlip("horizontal", seed=seed))
    if recipe.shift_pixels:
        factor = recipe.shift_pixels / 28
        # Nearest-pixel shifts: bilinear interpolation of fractional shifts would blur the training
        # images, which the sharp test images never are.
        steps.append(
            layers.RandomTranslation(
                factor, factor, fill_mode="constant", fill_value=0.0, interpolation="nearest", seed=seed + 1
            )
        )
    if recipe.erasing:
        steps.append(layers.RandomErasing(factor=recipe.erasing, value_range=(0, 1), fill_value=0.0, seed=seed + 2))
    return keras.Sequential(steps, name="augmentation") if steps else None


def one_hot(labels: np.ndarray) -> np.ndarray:
    """Integer labels as float32 one-hot rows: the targets of the recipes' categorical loss."""
    return np.eye(NUM_CLASSES, dtype=np.float32)[labels]


def training_dataset(x: np.ndarray, y: np.ndarray, recipe: Recipe, seed: int) -> tf.data.Dataset:
    """Shuffled, batched, augmented (if the recipe says so) one-hot training data."""
    targets = one_hot(y)
    dataset = tf.data.Dataset.from_tensor_slices((x, targets))
    dataset = dataset.shuffle(len(y), seed=seed, reshuffle_each_iteration=True).batch(recipe.batch_size)
    augment = augmenter(recipe, seed)
    if augment is not None:
        dataset = dataset.map(lambda images, labels: (augment(images, training=True), labels))
    return dataset.prefetch(tf.data.AUTOTUNE)


def compiled_network(recipe: Recipe, steps_per_epoch: int) -> keras.Model:
    """The recipe's network with Adam, its learning-rate schedule and its loss."""
    model = build_network(recipe.architecture, dropout_rate=recipe.dropout_rate, **recipe.network_options())
    learning_rate: float | keras.optimizers.schedules.LearningRateSchedule = recipe.learning_rate
    if recipe.schedule == "cosine":
        learning_rate = keras.optimizers.schedules.CosineDecay(recipe.learning_rate, recipe.epochs * steps_per_epoch)
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=learning_rate),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=recipe.label_smoothing),
        metrics=["accuracy"],
    )
    return model


@dataclass
class Fitted:
    model: keras.Model
    history: dict[str, list[float]]
    best_epoch: int
    train_seconds: float


def fit(recipe: Recipe, x_train, y_train, x_val, y_val, *, seed: int, verbose: int = 2) -> Fitted:
    """Train one recipe; validation data drives early stopping (when ``patience`` > 0) and nothing else."""
    set_seed(seed)
    steps_per_epoch = int(np.ceil(len(y_train) / recipe.batch_size))
    model = compiled_network(recipe, steps_per_epoch)
    callbacks: list[keras.callbacks.Callback] = [EpochTimer()]
    if recipe.patience:
        callbacks.append(
            keras.callbacks.EarlyStopping(monitor="val_loss", patience=recipe.patience, restore_best_weights=True)
        )
    validation = (x_val, one_hot(y_val))
    started = time.perf_counter()
    history = model.fit(
        training_dataset(x_train, y_train, recipe, seed),
        epochs=recipe.epochs,
        validation_data=validation,
        callbacks=callbacks,
        shuffle=False,  # The dataset shuffles itself, with the run's seed.
        verbose=verbose,
    )
    seconds = time.perf_counter() - started
    values = {name: [float(v) for v in series] for name, series in history.history.items()}
    epochs_run = len(values["val_loss"])
    best_epoch = int(np.argmin(values["val_loss"])) + 1 if recipe.patience else epochs_run
    return Fitted(model, values, best_epoch, seconds)


def train(
    x_train,
    y_train,
    x_val,
    y_val,
    *,
    learning_rate: float,
    batch_size: int,
    dropout_rate: float,
    epochs: int,
    patience: int,
    seed: int,
    verbose: int = 2,
    **recipe_fields,
) -> tuple[keras.Model, dict[str, list[float]], int]:
    """Fit the seed CNN with early stopping on validation loss, restoring the best weights.

    ``recipe_fields`` (schedule, horizontal_flip, ...) change how it trains; see
    ``fmnist.recipes.Recipe``. Returns the model, its per-epoch history and the
    (1-based) epoch whose weights it holds.
    """
    recipe = Recipe(
        name="03_train",
        learning_rate=learning_rate,
        batch_size=batch_size,
        dropout_rate=dropout_rate,
        epochs=epochs,
        patience=patience,
        **recipe_fields,
    )
    fitted = fit(recipe, x_train, y_train, x_val, y_val, seed=seed, verbose=verbose)
    return fitted.model, fitted.history, fitted.best_epoch


def save_model(model: keras.Model, path: Path) -> Path:
    """Save as ``.keras``; the previous file stays until the new one is complete."""
    if path.suffix != ".keras":
        raise ValueError(f"{path}: the model file must end in .keras.")
    with atomic_path(path) as temporary:
        model.save(temporary)
    return path


def load_model(path: Path) -> keras.Model:
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"{path}: no trained model. Run the 03_train stage first (`fmnist run --stage 03_train`)."
        )
    return keras.models.load_model(path)
