"""Train the seed CNN with early stopping and save it atomically."""

from __future__ import annotations

import time
from pathlib import Path

from fmnist.config import SEED_HYPERPARAMETERS
from fmnist.io import atomic_path, read_json
from fmnist.runtime import quiet_tensorflow

quiet_tensorflow()

import keras  # noqa: E402

from fmnist.model import build_model  # noqa: E402


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
    verbose: int = 2,
) -> tuple[keras.Model, dict[str, list[float]], int]:
    """Fit with early stopping on validation loss, restoring the best weights.

    Returns the model, its per-epoch history and the (1-based) epoch whose weights it holds.
    """
    if epochs < 1:
        raise ValueError(f"epochs={epochs}: train for at least one epoch.")
    model = build_model(dropout_rate=dropout_rate, learning_rate=learning_rate)
    early_stopping = keras.callbacks.EarlyStopping(
        monitor="val_loss", patience=patience, restore_best_weights=True, start_from_epoch=0
    )
    history = model.fit(
        x_train,
        y_train,
        batch_size=batch_size,
        epochs=epochs,
        validation_data=(x_val, y_val),
        callbacks=[EpochTimer(), early_stopping],
        verbose=verbose,
    )
    values = {name: [float(v) for v in series] for name, series in history.history.items()}
    best_epoch = int(min(range(len(values["val_loss"])), key=values["val_loss"].__getitem__)) + 1
    return model, values, best_epoch


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
