"""Hyperparameter search over the seed's space with keras-tuner, on the validation split."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from fmnist.runtime import quiet_tensorflow

quiet_tensorflow()

import keras_tuner  # noqa: E402

from fmnist.model import build_model  # noqa: E402

# The seed document's search space.
SEED_SEARCH_SPACE = {
    "learning_rate": [1e-3, 1e-4, 1e-5],
    "batch_size": [32, 64, 128],
    "dropout_rate": [0.1, 0.3, 0.5],
}
TUNERS = ("grid", "random", "hyperband")
# Trials are ranked as early stopping ranks epochs: by validation loss.
OBJECTIVES = {"val_loss": "min", "val_accuracy": "max"}


class SeedHyperModel(keras_tuner.HyperModel):
    """The seed CNN with learning rate and dropout as model hyperparameters, batch size as a fit one."""

    def __init__(self, search_space: dict[str, list]):
        super().__init__(name="seed_cnn")
        self.search_space = search_space
        self.fit_seconds: dict[str, float] = {}

    def build(self, hp: keras_tuner.HyperParameters):
        return build_model(
            dropout_rate=hp.Choice("dropout_rate", self.search_space["dropout_rate"]),
            learning_rate=hp.Choice("learning_rate", self.search_space["learning_rate"]),
        )

    def fit(self, hp: keras_tuner.HyperParameters, model, *args, **kwargs):
        started = time.perf_counter()
        history = model.fit(*args, batch_size=hp.Choice("batch_size", self.search_space["batch_size"]), **kwargs)
        self.fit_seconds[_key(hp.values)] = time.perf_counter() - started
        return history


def _key(values: dict) -> str:
    return ",".join(f"{name}={values[name]}" for name in sorted(values))


def make_tuner(
    tuner: str,
    directory: Path,
    search_space: dict[str, list],
    max_trials: int,
    epochs: int,
    seed: int,
    objective: str = "val_loss",
) -> keras_tuner.Tuner:
    """Build the chosen tuner; ``max_trials=0`` means the whole grid.

    Hyperband gives every configuration a short budget and the best ones up to
    ``epochs``: successive halving, so the winner is judged after the longer
    training in which over-fitting (and so dropout) matters.
    """
    if tuner not in TUNERS:
        raise ValueError(f"tuner={tuner!r}: choose one of {', '.join(TUNERS)}.")
    if objective not in OBJECTIVES:
        raise ValueError(f"objective={objective!r}: choose one of {', '.join(OBJECTIVES)}.")
    grid_size = int(np.prod([len(values) for values in search_space.values()]))
    common = dict(
        hypermodel=SeedHyperModel(search_space),
        objective=keras_tuner.Objective(objective, direction=OBJECTIVES[objective]),
        seed=seed,
        directory=str(directory.parent),
        project_name=directory.name,
        overwrite=True,
    )
    if tuner == "grid":
        return keras_tuner.GridSearch(max_trials=max_trials or grid_size, **common)
    if tuner == "random":
        return keras_tuner.RandomSearch(max_trials=max_trials or grid_size, **common)
    return keras_tuner.Hyperband(max_epochs=max(epochs, 2), factor=3, hyperband_iterations=1, **common)


def run_search(
    x_train,
    y_train,
    x_val,
    y_val,
    *,
    tuner: str,
    directory: Path,
    epochs: int,
    max_trials: int,
    seed: int,
    search_space: dict[str, list] | None = None,
    objective: str = "val_loss",
    verbose: int = 2,
):
    """Run the search; return the tuner and a table (pandas) of every trial, best first."""
    import pandas as pd

    search_space = search_space or SEED_SEARCH_SPACE
    missing = set(SEED_SEARCH_SPACE) - set(search_space)
    if missing:
        raise ValueError(f"search_space lacks {sorted(missing)}; give a list of values for each.")
    search = make_tuner(tuner, directory, search_space, max_trials, epochs, seed, objective)
    search.search(x_train, y_train, epochs=epochs, validation_data=(x_val, y_val), verbose=verbose)
    rows = []
    for trial in search.oracle.trials.values():
        if trial.status != "COMPLETED":
            continue
        values = {name: trial.hyperparameters.values[name] for name in SEED_SEARCH_SPACE}
        rows.append(
            {
                "trial": trial.trial_id,
                **values,
                "epochs": int(trial.hyperparameters.values.get("tuner/epochs", epochs)),
                "val_loss": trial.metrics.get_best_value("val_loss"),
                "val_accuracy": trial.metrics.get_best_value("val_accuracy"),
                "fit_seconds": round(search.hypermodel.fit_seconds.get(_key(trial.hyperparameters.values), np.nan), 1),
            }
        )
    if not rows:
        raise RuntimeError(f"Every tuning trial failed; see the tuner's logs in {directory}.")
    ascending = OBJECTIVES[objective] == "min"
    trials = pd.DataFrame(rows).sort_values([objective, "epochs"], ascending=[ascending, False])
    return search, trials.reset_index(drop=True)


def best_hyperparameters(trials) -> dict[str, float | int]:
    """The best trial's values, with plain Python types."""
    best = trials.iloc[0]
    return {
        "learning_rate": float(best["learning_rate"]),
        "batch_size": int(best["batch_size"]),
        "dropout_rate": float(best["dropout_rate"]),
    }


# The recipe fields a recipe search may tune: they change training, not the network's cost.
RECIPE_SEARCH_FIELDS = ("learning_rate", "dropout_rate", "label_smoothing", "erasing", "shift_pixels")


class RecipeHyperModel(keras_tuner.HyperModel):
    """A training recipe whose fields in ``search_space`` keras-tuner chooses."""

    def __init__(self, recipe, search_space: dict[str, list], steps_per_epoch: int):
        super().__init__(name=f"{recipe.name}_search")
        self.recipe, self.search_space, self.steps_per_epoch = recipe, search_space, steps_per_epoch
        self.fit_seconds: dict[str, float] = {}

    def chosen(self, hp: keras_tuner.HyperParameters):
        import dataclasses

        values = {name: hp.Choice(name, choices) for name, choices in self.search_space.items()}
        return dataclasses.replace(self.recipe, **values)

    def build(self, hp: keras_tuner.HyperParameters):
        from fmnist.training import compiled_network

        return compiled_network(self.chosen(hp), self.steps_per_epoch)

    def fit(self, hp: keras_tuner.HyperParameters, model, x_train, y_train, seed: int, **kwargs):
        from fmnist.training import training_dataset

        started = time.perf_counter()
        dataset = training_dataset(x_train, y_train, self.chosen(hp), seed)
        history = model.fit(dataset, shuffle=False, **kwargs)
        self.fit_seconds[_key(hp.values)] = time.perf_counter() - started
        return history


def search_recipe(
    recipe,
    search_space: dict[str, list],
    x_train,
    y_train,
    x_val,
    y_val,
    *,
    max_epochs: int,
    directory: Path,
    seed: int,
    verbose: int = 2,
):
    """Hyperband over some of a recipe's fields, ranked by validation accuracy.

    Accuracy, not loss: a search over label smoothing would otherwise compare
    losses computed with different smoothing. The recipe's schedule runs over
    ``max_epochs``, the longest any trial trains. Returns keras-tuner's best
    values and a table (pandas) of every trial, best first.
    """
    import dataclasses

    import pandas as pd

    unknown = set(search_space) - set(RECIPE_SEARCH_FIELDS)
    if unknown or not search_space:
        raise ValueError(
            f"search space {sorted(search_space)}: give lists of values for some of {', '.join(RECIPE_SEARCH_FIELDS)}."
        )
    recipe = dataclasses.replace(recipe, epochs=max_epochs)
    hypermodel = RecipeHyperModel(recipe, search_space, int(np.ceil(len(y_train) / recipe.batch_size)))
    search = keras_tuner.Hyperband(
        hypermodel=hypermodel,
        objective=keras_tuner.Objective("val_accuracy", direction="max"),
        max_epochs=max_epochs,
        factor=3,
        hyperband_iterations=1,
        seed=seed,
        directory=str(directory.parent),
        project_name=directory.name,
        overwrite=True,
    )
    from fmnist.training import one_hot

    search.search(x_train, y_train, seed=seed, validation_data=(x_val, one_hot(y_val)), verbose=verbose)
    rows = []
    for trial in search.oracle.trials.values():
        if trial.status != "COMPLETED":
            continue
        rows.append(
            {
                "trial": trial.trial_id,
                **{name: trial.hyperparameters.values[name] for name in search_space},
                "epochs": int(trial.hyperparameters.values.get("tuner/epochs", max_epochs)),
                "val_accuracy": trial.metrics.get_best_value("val_accuracy"),
                "fit_seconds": round(hypermodel.fit_seconds.get(_key(trial.hyperparameters.values), np.nan), 1),
            }
        )
    if not rows:
        raise RuntimeError(f"Every search trial failed; see the tuner's logs in {directory}.")
    trials = pd.DataFrame(rows).sort_values("val_accuracy", ascending=False).reset_index(drop=True)
    chosen = search.get_best_hyperparameters(1)[0].values
    best = {name: type(getattr(recipe, name))(chosen[name]) for name in search_space}
    return best, trials
