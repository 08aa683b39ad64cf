"""Train a recipe (the study's model is the seed CNN's), with early stopping on validation; save atomically."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fmnist.config import IMAGE_SIZE, NUM_CLASSES, SEED_HYPERPARAMETERS
from fmnist.io import atomic_path, read_json, write_json
from fmnist.recipes import Recipe
from fmnist.runtime import quiet_tensorflow, set_seed

quiet_tensorflow()

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from fmnist.model import build_network, float32_copy, multiply_adds  # noqa: E402


def study_recipe(fields: dict[str, Any], best_hyperparameters_file: Path, name: str = "study") -> tuple[Recipe, str]:
    """The recipe a params mapping describes; with ``tuned: true`` it takes 02_tune's values (or the seed's).

    Returns the recipe and where its learning rate, batch size and dropout came from.
    """
    recipe = Recipe.from_params(name, fields)
    if not recipe.tuned:
        return recipe, "the recipe's own values"
    values, source = choose_hyperparameters(best_hyperparameters_file)
    return recipe.with_hyperparameters(values), source


def choose_hyperparameters(best_hyperparameters_file: Path) -> tuple[dict[str, float | int], str]:
    """The tuning stage's best values or, when it has not run, the seed's chosen values.

    Returns the hyperparameters and where they came from, for the report.
    """
    if best_hyperparameters_file.is_file():
        values = read_json(best_hyperparameters_file)
        source = values.pop("source", "")
        unknown = set(values) - set(SEED_HYPERPARAMETERS)
        missing = set(SEED_HYPERPARAMETERS) - set(values)
        if unknown or missing:
            raise ValueError(
                f"{best_hyperparameters_file}: expected keys {sorted(SEED_HYPERPARAMETERS)}, "
                f"missing {sorted(missing)}, unknown {sorted(unknown)}. Rerun the 02_tune stage."
            )
        where = f"tuning result ({best_hyperparameters_file.name}" + (f": {source})" if source else ")")
        return values, where
    return dict(SEED_HYPERPARAMETERS), "fallback: the seed's selected values (no tuning result found)"


class EpochTimer(keras.callbacks.Callback):
    """Record each epoch's wall time in the history."""

    def on_epoch_begin(self, epoch, logs=None):
        self._started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["epoch_seconds"] = time.perf_counter() - self._started


class TensorBoard(keras.callbacks.TensorBoard):
    """Keras' TensorBoard callback, kept light: each epoch's scalars only (no graph, histograms or profile).

    Pass it to ``fit(callbacks=[...])``. It writes ``train/`` and ``validation/``
    below ``log_dir``, one step per epoch. A fit that starts from scratch
    replaces those two directories, so a retrained model never shows on top of
    the curves of an earlier one; a fit resumed from its checkpoint (the
    optimizer has taken steps) continues them. keras-tuner recognises the
    callback by its class name and gives each trial its own
    ``<trial>/execution0/`` with its hyperparameters (the HParams dashboard).
    Not part of ``training_path()``: logging does not change what a training computes.
    """

    def __init__(self, log_dir: str | Path, **options: Any):
        light = {"write_graph": False, "histogram_freq": 0, "profile_batch": 0, "update_freq": "epoch"}
        super().__init__(log_dir=str(log_dir), **{**light, **options})

    def on_train_begin(self, logs=None):
        if int(self.model.optimizer.iterations) == 0:
            # Only this callback's own directories: keras-tuner's hyperparameter summary, written beside
            # them by a writer it opened before the fit, must stay.
            for name in ("train", "validation"):
                shutil.rmtree(Path(self.log_dir) / name, ignore_errors=True)
        super().on_train_begin(logs)


def steps_per_epoch(images: int, batch_size: int) -> int:
    """Batches in one pass over ``images`` training images (the last one may be smaller)."""
    return int(np.ceil(images / batch_size))


def augment_batch(images: tf.Tensor, recipe: Recipe, seed: tf.Tensor) -> tf.Tensor:
    """The recipe's training-time augmentation of one batch, vectorised and stateless.

    ``seed`` is a pair of integers (the run's seed and the global step): the
    same pair always gives the same augmentation, so a resumed training sees
    exactly the batches an uninterrupted one would have seen.
    """
    count = tf.shape(images)[0]
    size = IMAGE_SIZE

    def draw(offset: int, shape, low=0.0, high=1.0, dtype=tf.float32):
        pair = tf.stack([seed[0] * 8 + offset, seed[1]])
        if dtype == tf.int32:
            return tf.random.stateless_uniform(shape, pair, minval=low, maxval=high, dtype=tf.int32)
        return tf.random.stateless_uniform(shape, pair, minval=low, maxval=high)

    if recipe.horizontal_flip:
        mirror = draw(1, [count, 1, 1, 1]) < 0.5
        images = tf.where(mirror, tf.reverse(images, axis=[2]), images)
    if recipe.shift_pixels:
        # Whole-pixel shifts with black fill: pad, then cut a 28x28 window at a random offset per image.
        # Interpolated shifts would blur the training images, which the sharp test images never are.
        pad = recipe.shift_pixels
        padded = tf.pad(images, [[0, 0], [pad, pad], [pad, pad], [0, 0]])
        offsets = draw(2, [count, 2], 0, 2 * pad + 1, tf.int32)
        window = tf.range(size)[tf.newaxis, :]
        rows = offsets[:, :1] + window
        columns = offsets[:, 1:] + window
        images = tf.gather(padded, rows, axis=1, batch_dims=1)
        images = tf.gather(images, columns, axis=2, batch_dims=1)
    if recipe.erasing:
        # Random erasing (Zhong et al.): with probability `erasing`, black out a rectangle covering
        # 2-33 % of the image with an aspect ratio between 0.3 and 3.3.
        area = draw(3, [count]) * 0.31 + 0.02
        log_ratio = draw(4, [count], np.log(0.3), np.log(3.3))
        ratio = tf.exp(log_ratio)
        height = tf.clip_by_value(tf.round(tf.sqrt(area * size * size * ratio)), 1, size)
        width = tf.clip_by_value(tf.round(tf.sqrt(area * size * size / ratio)), 1, size)
        top = tf.floor(draw(5, [count]) * (size - height + 1))
        left = tf.floor(draw(6, [count]) * (size - width + 1))
        erase = draw(7, [count]) < recipe.erasing
        position = tf.cast(tf.range(size), tf.float32)
        inside_rows = (position[tf.newaxis, :] >= top[:, tf.newaxis]) & (
            position[tf.newaxis, :] < (top + height)[:, tf.newaxis]
        )
        inside_columns = (position[tf.newaxis, :] >= left[:, tf.newaxis]) & (
            position[tf.newaxis, :] < (left + width)[:, tf.newaxis]
        )
        mask = inside_rows[:, :, tf.newaxis] & inside_columns[:, tf.newaxis, :] & erase[:, tf.newaxis, tf.newaxis]
        images = tf.where(mask[..., tf.newaxis], tf.zeros_like(images), images)
    return images


def one_hot(labels: np.ndarray) -> np.ndarray:
    """Integer labels as float32 one-hot rows: the targets of the recipes' categorical loss."""
    return np.eye(NUM_CLASSES, dtype=np.float32)[labels]


def training_targets(y: np.ndarray) -> np.ndarray:
    """The rows a training fits: one-hot rows for integer labels, or given probability rows (distillation)."""
    y = np.asarray(y)
    if y.ndim == 1:
        return one_hot(y)
    if y.ndim != 2 or y.shape[1] != NUM_CLASSES:
        raise ValueError(f"targets of shape {y.shape}: give integer labels or rows of {NUM_CLASSES} probabilities.")
    return y.astype(np.float32)


def resolve_precision(requested: str) -> str:
    """The precision a recipe trains in here: "auto" is bfloat16 where the CPU has native bf16, else float32."""
    if requested != "auto":
        return requested
    from fmnist.manifest import machine

    return machine()["auto_precision"]


def epoch_orders(images: int, epochs: int, seed: int) -> np.ndarray:
    """The order in which each epoch visits the training images: one seeded permutation per epoch."""
    return np.stack([np.random.default_rng([seed, epoch]).permutation(images) for epoch in range(epochs)])


def epoch_plan(recipe: Recipe, train_images: int) -> list[int]:
    """How many training images each epoch of the recipe trains on.

    Every image in every epoch, unless the recipe selects hard images
    (``hard_share`` > 0): then ``hard_plain_epochs`` epochs see every image, and
    each later epoch sees the ``hard_share`` of images with the highest loss when
    last trained on plus ``hard_rest_share`` of the others (:func:`hard_selection`).
    Those shorter epochs fill the same budget of images seen, ``epochs`` x
    ``train_images``, without passing it.
    """
    if not recipe.hard_share:
        return [train_images] * recipe.epochs
    per_epoch = selected_images(recipe, train_images)
    if per_epoch < 1:
        raise ValueError(
            f"recipe {recipe.name!r}: hard_share={recipe.hard_share} and hard_rest_share={recipe.hard_rest_share} "
            f"select no image of {train_images}; give larger shares or more training images."
        )
    budget = (recipe.epochs - recipe.hard_plain_epochs) * train_images
    return [train_images] * recipe.hard_plain_epochs + [per_epoch] * (budget // per_epoch)


def selected_images(recipe: Recipe, train_images: int) -> int:
    """The images of one hard-image epoch: the hardest ``hard_share``, and ``hard_rest_share`` of the rest."""
    return int(round(train_images * (recipe.hard_share + recipe.hard_rest_share * (1 - recipe.hard_share))))


def hard_selection(losses: np.ndarray, recipe: Recipe, seed: int, epoch: int) -> np.ndarray:
    """The images one hard-image epoch trains on, in the order it visits them.

    ``losses`` holds each training image's loss when it was last trained on.
    The ``hard_share`` with the highest ones are kept, the others are drawn from
    the rest at random, and the whole is shuffled; the random draws come from
    (seed, epoch), so the same losses always give the same epoch (a resumed
    training restores them from its checkpoint).
    """
    by_loss, kept = by_loss_and_kept(losses, recipe)
    generator = np.random.default_rng([seed, epoch, 1])
    others = generator.choice(by_loss[kept:], selected_images(recipe, len(losses)) - kept, replace=False)
    return generator.permutation(np.concatenate([by_loss[:kept], others]))


def by_loss_and_kept(losses: np.ndarray, recipe: Recipe) -> tuple[np.ndarray, int]:
    """The images from the highest loss to the lowest (ties in index order), and how many a hard-image epoch keeps."""
    return np.argsort(-np.asarray(losses), kind="stable"), int(round(recipe.hard_share * len(losses)))


def batches(
    images: tf.Tensor,
    targets: tf.Tensor,
    orders: np.ndarray,
    recipe: Recipe,
    seed: int,
    first_step: int,
    with_index: bool = False,
) -> tf.data.Dataset:
    """The batches of epochs whose orders of visiting the images are the rows of ``orders``.

    The first batch is global step ``first_step``; each batch's augmentation is
    drawn from (seed, global step). With ``with_index``, a batch also gives the
    images' positions in ``images`` (the hard-image training records their losses).
    """
    orders = np.atleast_2d(orders)
    batch_size, per_epoch = recipe.batch_size, orders.shape[1]
    steps = steps_per_epoch(per_epoch, batch_size)
    order_table = tf.constant(orders, dtype=tf.int32)

    def batch(step):
        epoch, position = (step - first_step) // steps, (step - first_step) % steps
        start = tf.cast(position * batch_size, tf.int32)
        chosen = order_table[tf.cast(epoch, tf.int32), start : tf.minimum(start + batch_size, per_epoch)]
        batch_images = tf.gather(images, chosen)
        if recipe.augments:
            batch_images = augment_batch(batch_images, recipe, tf.stack([tf.cast(seed, tf.int64), step]))
        if with_index:
            return batch_images, tf.gather(targets, chosen), chosen
        return batch_images, tf.gather(targets, chosen)

    dataset = tf.data.Dataset.range(first_step, first_step + len(orders) * steps)
    return dataset.map(batch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).prefetch(tf.data.AUTOTUNE)


def training_dataset(x: np.ndarray, y: np.ndarray, recipe: Recipe, seed: int, first_epoch: int = 0) -> tf.data.Dataset:
    """Shuffled, batched, augmented (if the recipe says so) one-hot training data for epochs ``first_epoch`` on.

    Every batch is a pure function of (seed, epoch, step): each epoch's order is
    a permutation drawn from (seed, epoch), and each batch's augmentation from
    (seed, global step). A training resumed at epoch k therefore sees the same
    batches as one that never stopped. Pass ``steps_per_epoch`` to ``fit``.
    (A hard-image recipe's later epochs are built one at a time, in ``fit``.)
    """
    if not 0 <= first_epoch < recipe.epochs:
        raise ValueError(f"first_epoch={first_epoch}: must be in [0, {recipe.epochs}).")
    orders = epoch_orders(len(y), recipe.epochs, seed)[first_epoch:]
    images, targets = tf.constant(x), tf.constant(training_targets(y))
    return batches(images, targets, orders, recipe, seed, first_epoch * steps_per_epoch(len(y), recipe.batch_size))


def learning_rate_schedule(
    recipe: Recipe, steps_per_epoch: int, total_steps: int | None = None
) -> float | keras.optimizers.schedules.LearningRateSchedule:
    """The recipe's learning rate per step: constant, or a cosine decay to 0 (after a linear warm-up from 0).

    ``steps_per_epoch`` is a full epoch's (the warm-up lasts ``warmup_epochs`` of
    them); the decay ends after ``total_steps`` (by default ``epochs`` full epochs;
    a hard-image recipe's epochs are shorter, see :func:`plan_steps`).
    """
    if recipe.schedule != "cosine":
        return recipe.learning_rate
    warmup = recipe.warmup_epochs * steps_per_epoch
    total_steps = recipe.epochs * steps_per_epoch if total_steps is None else total_steps
    return keras.optimizers.schedules.CosineDecay(
        0.0 if warmup else recipe.learning_rate,
        total_steps - warmup,
        warmup_target=recipe.learning_rate if warmup else None,
        warmup_steps=warmup,
    )


def compiled_network(recipe: Recipe, steps_per_epoch: int, total_steps: int | None = None) -> keras.Model:
    """The recipe's network with its optimizer, learning-rate schedule, loss and precision."""
    precision = resolve_precision(recipe.precision)
    # Layers take the global policy when they are built; the softmax layer always computes in float32.
    keras.mixed_precision.set_global_policy("mixed_bfloat16" if precision == "bfloat16" else "float32")
    try:
        model = build_network(recipe.architecture, dropout_rate=recipe.dropout_rate, **recipe.network_options())
    finally:
        keras.mixed_precision.set_global_policy("float32")
    learning_rate = learning_rate_schedule(recipe, steps_per_epoch, total_steps)
    weight_decay = recipe.weight_decay or None
    if recipe.optimizer == "sgd":
        optimizer = keras.optimizers.SGD(learning_rate, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    else:
        optimizer = keras.optimizers.Adam(learning_rate=learning_rate, weight_decay=weight_decay)
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=recipe.label_smoothing),
        metrics=["accuracy"],
    )
    return model


def plan_steps(recipe: Recipe, train_images: int) -> list[int]:
    """The batches of each epoch of :func:`epoch_plan`."""
    return [steps_per_epoch(images, recipe.batch_size) for images in epoch_plan(recipe, train_images)]


class HardImageModel(keras.Model):
    """A network that records each training image's loss as its training step computes it.

    Hard-image selection (:func:`hard_selection`) reads ``last_loss``, so choosing
    costs no computation. The batches give each image's index as a third element
    (:func:`batches` with ``with_index``). ``last_loss`` is one of the model's
    variables, so an epoch checkpoint keeps it and a resumed training selects the
    same images. What is saved and evaluated is ``network``.
    """

    def __init__(self, network: keras.Model, train_images: int, label_smoothing: float = 0.0):
        super().__init__(name=f"{network.name}_hard_images")
        self.network = network
        self.label_smoothing = label_smoothing
        # Images not trained on yet count as the hardest.
        self.last_loss = self.add_weight(
            shape=(train_images,), initializer=keras.initializers.Constant(1e9), trainable=False, name="last_loss"
        )
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.accuracy = keras.metrics.CategoricalAccuracy(name="accuracy")

    def call(self, images, training=False):
        return self.network(images, training=training)

    def _per_image_loss(self, targets, predicted):
        return tf.cast(
            keras.losses.categorical_crossentropy(targets, predicted, label_smoothing=self.label_smoothing), tf.float32
        )

    def _batch_loss(self, per_image):
        loss = tf.reduce_mean(per_image)
        return loss + tf.add_n(self.network.losses) if self.network.losses else loss

    def train_step(self, data):
        images, targets, index = data
        with tf.GradientTape() as tape:
            predicted = self.network(images, training=True)
            per_image = self._per_image_loss(targets, predicted)
            loss = self._batch_loss(per_image)
        variables = self.network.trainable_variables
        self.optimizer.apply(tape.gradient(loss, variables), variables)
        self.last_loss.assign(tf.tensor_scatter_nd_update(self.last_loss, index[:, tf.newaxis], per_image))
        return self._update_metrics(loss, targets, predicted)

    def test_step(self, data):
        images, targets = data[0], data[1]
        predicted = self.network(images, training=False)
        return self._update_metrics(self._batch_loss(self._per_image_loss(targets, predicted)), targets, predicted)

    def _update_metrics(self, loss, targets, predicted):
        # Weighted by the batch's images, as Keras' own loss tracker: a smaller last batch counts for less.
        self.loss_tracker.update_state(loss, sample_weight=tf.shape(targets)[0])
        self.accuracy.update_state(targets, predicted)
        return {"loss": self.loss_tracker.result(), "accuracy": self.accuracy.result()}

    @property
    def metrics(self):
        return [self.loss_tracker, self.accuracy]


def build(recipe: Recipe, train_images: int, seed: int) -> keras.Model:
    """Seed every random source, then build and compile the recipe's network (the weights depend on ``seed``).

    A hard-image recipe's network comes wrapped in a :class:`HardImageModel` that shares its optimizer.
    """
    set_seed(seed)
    steps = plan_steps(recipe, train_images)
    network = compiled_network(recipe, steps[0], sum(steps))
    if not recipe.hard_share:
        return network
    model = HardImageModel(network, train_images, recipe.label_smoothing)
    model.compile(optimizer=network.optimizer)
    return model


@dataclass
class Fitted:
    model: keras.Model
    history: dict[str, list[float]]
    best_epoch: int  # 1-based: the epoch whose weights the model holds.
    train_seconds: float
    resumed_at: int = 0  # Epochs that were already done in a checkpoint when this fit started.
    precision: str = "float32"  # What the training computed in ("bfloat16": mixed, float32 weights).
    images_per_epoch: list[int] | None = None  # The images each epoch trained on.
    # A hard-image training: how many of each class are among its hard_share of images with the highest loss at the
    # end (None for other trainings).
    hardest_per_class: list[int] | None = None

    def __post_init__(self):
        if self.images_per_epoch is None or len(self.images_per_epoch) != self.epochs_run:
            raise ValueError(
                f"images_per_epoch must give the images of each of the {self.epochs_run} epochs run, "
                f"not {self.images_per_epoch!r}: the training's compute counts them."
            )

    @property
    def epochs_run(self) -> int:
        return len(self.history["loss"])

    def best(self, metric: str) -> float:
        return self.history[metric][self.best_epoch - 1]

    def summary(self, recipe: Recipe, train_images: int) -> dict[str, Any]:
        """What a trained model is and how it got there: the study's training.json and each experiment run."""
        cost = multiply_adds(self.model)
        return {
            "recipe": recipe.as_dict(),
            "parameters": int(self.model.count_params()),
            "multiply_adds": cost,
            "train_images": int(train_images),
            "train_seconds": round(self.train_seconds, 1),
            "precision": self.precision,
            "compute": training_compute(cost, sum(self.images_per_epoch), self.history),
            "epochs_run": self.epochs_run,
            "best_epoch": self.best_epoch,
            "resumed_at_epoch": self.resumed_at,
            "hard_images": None
            if self.hardest_per_class is None
            else {
                "selected_epochs": max(0, self.epochs_run - recipe.hard_plain_epochs),
                "images_per_selected_epoch": selected_images(recipe, train_images),
                "hardest_per_class": self.hardest_per_class,
            },
            # None for a final fit (``Recipe.final_fit_of``): it trained on the validation split too.
            "validation": (
                {"accuracy": self.best("val_accuracy"), "loss": self.best("val_loss")}
                if "val_loss" in self.history
                else None
            ),
        }


class EpochCheckpoint(keras.callbacks.Callback):
    """After every epoch, store what a resumed fit needs to continue exactly where this one is.

    That is every variable of the model and its optimizer (the weights, Adam's
    moments and step count, the dropout layers' random-generator states), the
    early-stopping state with its best weights, and the history so far. The
    state file is replaced last and atomically, so a kill at any moment leaves
    the previous complete epoch.
    """

    STATE = "state.json"

    def __init__(self, directory: Path, request: str, early_stopping: keras.callbacks.EarlyStopping | None):
        super().__init__()
        self.directory, self.request, self.early_stopping = Path(directory), request, early_stopping
        self.history: dict[str, list[float]] = {}
        self.restored: dict[str, Any] | None = None

    def load(self, model: keras.Model) -> dict[str, Any] | None:
        """Restore ``model`` from the last complete epoch of the same request; None when there is none."""
        state_path = self.directory / self.STATE
        if not state_path.is_file():
            return None
        state = read_json(state_path)
        if state.get("request") != self.request:
            _say(f"checkpoint in {self.directory} is for other settings or code; starting fresh")
            shutil.rmtree(self.directory, ignore_errors=True)
            return None
        with np.load(self.directory / state["variables"]) as stored:
            values = [stored[f"v{index}"] for index in range(len(stored.files))]
        model.optimizer.build(model.trainable_variables)
        variables = [*model.variables, *model.optimizer.variables]
        if len(values) != len(variables):
            raise RuntimeError(
                f"{self.directory}: checkpoint holds {len(values)} variables, the model {len(variables)}."
            )
        for variable, value in zip(variables, values, strict=True):
            variable.assign(value)
        self.history = state["history"]
        self.restored = state
        return state

    def on_train_begin(self, logs=None):
        if self.restored and self.early_stopping is not None:
            stopping = self.restored["early_stopping"]
            self.early_stopping.wait = stopping["wait"]
            self.early_stopping.best = stopping["best"]
            self.early_stopping.best_epoch = stopping["best_epoch"]
            with np.load(self.directory / stopping["best_weights"]) as stored:
                self.early_stopping.best_weights = [stored[f"w{i}"] for i in range(len(stored.files))]

    def on_epoch_end(self, epoch, logs=None):
        for name, value in (logs or {}).items():
            self.history.setdefault(name, []).append(float(value))
        variables = [*self.model.variables, *self.model.optimizer.variables]
        variables_file = f"variables_epoch{epoch + 1}.npz"
        with atomic_path(self.directory / variables_file) as temporary:
            np.savez(temporary, **{f"v{index}": np.asarray(v) for index, v in enumerate(variables)})
        state = {
            "request": self.request,
            "epochs_done": epoch + 1,
            "stopped": bool(self.model.stop_training),
            "variables": variables_file,
            "history": self.history,
            "early_stopping": None,
        }
        stopping = self.early_stopping
        if stopping is not None and stopping.best_weights is not None:
            weights_file = f"best_weights_epoch{stopping.best_epoch + 1}.npz"
            if not (self.directory / weights_file).is_file():
                with atomic_path(self.directory / weights_file) as temporary:
                    np.savez(temporary, **{f"w{i}": w for i, w in enumerate(stopping.best_weights)})
            best = stopping.best
            state["early_stopping"] = {
                "wait": stopping.wait,
                "best": None if best is None else float(best),
                "best_epoch": stopping.best_epoch,
                "best_weights": weights_file,
            }
        write_json(self.directory / self.STATE, state)
        keep = {variables_file, (state["early_stopping"] or {}).get("best_weights"), self.STATE}
        for path in self.directory.glob("*.npz"):
            if path.name not in keep:
                path.unlink(missing_ok=True)


def _say(message: str) -> None:
    print(f"[train] {message}", file=sys.stderr, flush=True)


def training_compute(multiply_adds: int, images_seen: int, history: dict[str, list[float]]) -> dict[str, Any]:
    """A training's compute, comparable across machines, and how fast this machine delivered it.

    ``flops`` counts 6 floating-point operations per multiply-add per training
    image seen (2 for the forward pass, 4 for the backward one). The achieved
    rate divides it by the epochs' wall time (validation included) and is set
    against this machine's measured float32 peak over all cores
    (:func:`fmnist.bench.matmul_gflops`); a bfloat16 training may pass it.
    """
    from fmnist.bench import matmul_gflops

    seconds = float(sum(history.get("epoch_seconds", [])))
    flops = 6 * int(multiply_adds) * int(images_seen)
    achieved = flops / seconds / 1e9 if seconds > 0 else None
    try:
        peak = matmul_gflops(threads=0)
    except RuntimeError as error:  # A failed probe must not cost a finished training.
        _say(f"no peak figure: {error}")
        peak = None
    return {
        "flops": flops,
        "tflops": round(flops / 1e12, 3),
        "images_seen": int(images_seen),
        "achieved_gflops": None if achieved is None else round(achieved, 1),
        # A float32 figure: a bfloat16 training can pass it (its ratio above 1 says so).
        "peak_gflops": None if peak is None else round(peak, 1),
        "fraction_of_peak": None if achieved is None or peak is None else round(achieved / peak, 3),
    }


def fit(
    recipe: Recipe,
    x_train,
    y_train,
    x_val,
    y_val,
    *,
    seed: int,
    model: keras.Model | None = None,
    checkpoint_dir: Path | None = None,
    callbacks: list[keras.callbacks.Callback] | tuple = (),
    epochs: int | None = None,
    initial_epoch: int = 0,
    verbose: int = 2,
) -> Fitted:
    """Train one recipe: the one training path of the study, its tuning trials and its experiments.

    Validation data drives early stopping (when ``patience`` > 0) and nothing
    else; a final fit (``Recipe.final_fit_of``) has none: ``x_val`` and ``y_val``
    are None. ``model`` is a network from ``build`` (built here when None). With a
    ``checkpoint_dir`` every epoch is checkpointed there, and a fit of the same
    recipe, data and seed continues from the last complete epoch with the same
    result an uninterrupted fit would have had. ``epochs`` and
    ``initial_epoch`` let keras-tuner's Hyperband train a trial in rounds.

    A hard-image recipe (``hard_share`` > 0) trains the epochs of
    :func:`epoch_plan`, more and shorter than ``epochs``, choosing each one's
    images from the losses of the epochs before (:func:`fit_hard_images`).
    """
    if recipe.hard_share and epochs is not None:
        raise ValueError(
            f"recipe {recipe.name!r}: hard-image selection (hard_share={recipe.hard_share}) plans its own epochs "
            "from the recipe's budget, so it cannot train in rounds of given epochs (keras-tuner's Hyperband); "
            "tune a recipe with hard_share: 0."
        )
    plan = epoch_plan(recipe, len(y_train))
    epochs = len(plan) if epochs is None else epochs
    if x_val is None and recipe.patience:
        raise ValueError(
            f"recipe {recipe.name!r}: patience={recipe.patience} stops early on validation data, and none was "
            "given; give patience: 0 or validation images."
        )
    if model is None:
        model = build(recipe, len(y_train), seed)
    if bool(recipe.hard_share) != isinstance(model, HardImageModel):
        raise ValueError(
            f"recipe {recipe.name!r}: the model must come from training.build for this recipe "
            "(a hard-image recipe trains a HardImageModel, any other recipe the plain network)."
        )
    stopping = None
    callback_list: list[keras.callbacks.Callback] = [EpochTimer(), *callbacks]
    if recipe.patience:
        stopping = keras.callbacks.EarlyStopping(
            monitor="val_loss", patience=recipe.patience, restore_best_weights=True
        )
        callback_list.append(stopping)
    checkpoint = None
    if checkpoint_dir is not None:
        request = fit_request(recipe, x_train, y_train, x_val, y_val, seed, epochs)
        checkpoint = EpochCheckpoint(checkpoint_dir, request, stopping)
        state = checkpoint.load(model)
        if state is not None:
            initial_epoch = state["epochs_done"]
            if state["stopped"] or initial_epoch >= epochs:
                _say(f"checkpoint: training finished before ({initial_epoch}/{epochs} epochs); restoring it")
            else:
                _say(f"resuming at epoch {initial_epoch + 1}/{epochs} from {checkpoint_dir}")
        callback_list.append(checkpoint)
    started = time.perf_counter()
    finished = (
        checkpoint is not None
        and checkpoint.restored is not None
        and (checkpoint.restored["stopped"] or initial_epoch >= epochs)
    )
    if finished:
        if stopping is not None:
            checkpoint.on_train_begin()
            stopping.set_model(model)
            stopping.on_train_end()
        values = checkpoint.history
    elif recipe.hard_share:
        history = fit_hard_images(
            model,
            recipe,
            x_train,
            y_train,
            validation_data(x_val, y_val),
            seed=seed,
            plan=plan,
            initial_epoch=initial_epoch,
            callbacks=callback_list,
            verbose=verbose,
        )
        values = checkpoint.history if checkpoint is not None else history
    else:
        training = training_dataset(x_train, y_train, dataclasses.replace(recipe, epochs=epochs), seed, initial_epoch)
        history = model.fit(
            training,
            epochs=epochs,
            initial_epoch=initial_epoch,
            steps_per_epoch=steps_per_epoch(len(y_train), recipe.batch_size),
            shuffle=False,  # Each epoch's order comes from the dataset, seeded per epoch.
            validation_data=validation_data(x_val, y_val),
            callbacks=callback_list,
            verbose=verbose,
        )
        values = (
            checkpoint.history
            if checkpoint is not None
            else {name: [float(v) for v in series] for name, series in history.history.items()}
        )
    seconds = time.perf_counter() - started
    if checkpoint is not None and checkpoint.restored is not None:
        seconds += sum(checkpoint.restored["history"].get("epoch_seconds", []))
    epochs_run = len(values["loss"])
    best_epoch = int(np.argmin(values["val_loss"])) + 1 if recipe.patience else epochs_run
    resumed_at = checkpoint.restored["epochs_done"] if checkpoint is not None and checkpoint.restored else 0
    hardest_per_class = None
    if isinstance(model, HardImageModel):
        hardest_per_class = hardest_images_per_class(model, y_train, recipe)
        model = model.network
    precision = resolve_precision(recipe.precision)
    if precision != "float32":
        # What is evaluated, saved and exported is the float32 network: bf16 only speeds up the training.
        model = float32_copy(model)
    images = plan[:epochs_run] if recipe.hard_share else [len(y_train)] * epochs_run
    return Fitted(model, values, best_epoch, seconds, resumed_at, precision, images, hardest_per_class)


def validation_data(x_val, y_val) -> tuple[np.ndarray, np.ndarray] | None:
    """What ``model.fit`` validates on: the images with one-hot labels, or None (a final fit)."""
    return None if x_val is None else (x_val, one_hot(y_val))


def fit_hard_images(
    model: HardImageModel,
    recipe: Recipe,
    x_train,
    y_train,
    validation: tuple[np.ndarray, np.ndarray] | None,
    *,
    seed: int,
    plan: list[int],
    initial_epoch: int,
    callbacks: list[keras.callbacks.Callback],
    verbose: int,
) -> dict[str, list[float]]:
    """Train the epochs of a hard-image recipe's ``plan`` from ``initial_epoch`` on; returns their history.

    Each epoch's images depend on the losses the epochs before recorded, so each
    epoch gets its own input pipeline and ``model.fit`` call, while the callbacks
    see one training of all the epochs (one ``on_train_begin``, an
    ``on_epoch_end`` per epoch with its logs, one ``on_train_end``).
    """
    steps = [steps_per_epoch(images, recipe.batch_size) for images in plan]
    images, targets = tf.constant(x_train), tf.constant(training_targets(y_train))
    plain_orders = epoch_orders(len(y_train), recipe.hard_plain_epochs, seed)
    # Keras' History records the logs as the callbacks left them (with EpochTimer's epoch_seconds).
    recorder = keras.callbacks.History()
    callback_list = keras.callbacks.CallbackList([*callbacks, recorder], model=model, epochs=len(plan), verbose=0)
    callback_list.on_train_begin()
    for epoch in range(initial_epoch, len(plan)):
        if epoch < recipe.hard_plain_epochs:
            order = plain_orders[epoch]
        else:
            order = hard_selection(np.asarray(model.last_loss), recipe, seed, epoch)
        dataset = batches(images, targets, order, recipe, seed, sum(steps[:epoch]), with_index=True)
        callback_list.on_epoch_begin(epoch)
        result = model.fit(
            dataset, epochs=1, steps_per_epoch=steps[epoch], validation_data=validation, shuffle=False, verbose=0
        )
        logs = {name: float(series[-1]) for name, series in result.history.items()}
        callback_list.on_epoch_end(epoch, logs)
        logs = {name: series[-1] for name, series in recorder.history.items()}
        if verbose:
            # As Keras prints an epoch at verbose=2 (fmnist run shows these lines as progress), with its images.
            figures = " - ".join(f"{name}: {value:.4f}" for name, value in logs.items() if name != "epoch_seconds")
            kind = "every image" if epoch < recipe.hard_plain_epochs else "the hardest and others"
            seconds = logs.get("epoch_seconds", 0.0)
            print(f"Epoch {epoch + 1}/{len(plan)}", flush=True)
            print(
                f"{steps[epoch]}/{steps[epoch]} - {seconds:.0f}s - {plan[epoch]:,} images ({kind}) - {figures}",
                flush=True,
            )
        if model.stop_training:
            break
    callback_list.on_train_end()
    return {name: [float(value) for value in series] for name, series in recorder.history.items()}


def hardest_images_per_class(model: HardImageModel, y_train, recipe: Recipe) -> list[int]:
    """How many of each class are among the ``hard_share`` of images with the highest loss when last trained on.

    The losses are those of the weights the training hands back (early stopping restores the best epoch's). With
    soft targets (distillation) an image's class is its target's most likely one.
    """
    labels = np.asarray(y_train)
    labels = labels.argmax(axis=1) if labels.ndim == 2 else labels
    by_loss, kept = by_loss_and_kept(np.asarray(model.last_loss), recipe)
    return np.bincount(labels[by_loss[:kept]], minlength=NUM_CLASSES).tolist()


def fit_request(recipe: Recipe, x_train, y_train, x_val, y_val, seed: int, epochs: int) -> str:
    """What decides a fit's result: a checkpoint is resumed only by a fit with the same request."""
    digest = hashlib.sha256()
    for array in (x_train, y_train, x_val, y_val):
        digest.update(b"none" if array is None else np.ascontiguousarray(array).tobytes())
    settings = {
        "recipe": recipe.as_dict(),
        "precision": resolve_precision(recipe.precision),
        "seed": seed,
        "epochs": epochs,
        "code": training_code_version(),
    }
    digest.update(json.dumps(settings, sort_keys=True).encode())
    return digest.hexdigest()


def training_path() -> list:
    """The functions and classes that decide what a training computes, and so what a checkpoint or a trial holds.

    Editing anything else (reports, plots, this module's other helpers) leaves
    checkpoints and tuning state valid; editing one of these starts them afresh.
    """
    from fmnist import data, model, recipes, runtime

    return [
        data.read_idx,
        data.scale_images,
        data.load_fashion_mnist,
        data.train_validation_split,
        data.stratified_subset,
        runtime.set_seed,
        recipes.Recipe,
        model.seed_network,
        model.bn_cnn_network,
        model.build_network,
        steps_per_epoch,
        augment_batch,
        one_hot,
        training_targets,
        resolve_precision,
        learning_rate_schedule,
        epoch_orders,
        epoch_plan,
        selected_images,
        hard_selection,
        by_loss_and_kept,
        batches,
        training_dataset,
        compiled_network,
        plan_steps,
        HardImageModel,
        build,
        validation_data,
        fit_hard_images,
        EpochTimer,
        EpochCheckpoint,
        fit,
    ]


def training_code_version() -> str:
    """A digest of the training path's code: a checkpoint or tuning state from other code is not resumed."""
    return code_digest(training_path())


def code_digest(items) -> str:
    """A digest of code (files, or functions and classes) as syntax trees without docstrings.

    Layout, comments and docstrings don't count; any change to the code does.
    """
    import inspect
    import textwrap

    return source_digest(
        Path(item).read_text() if isinstance(item, str | Path) else textwrap.dedent(inspect.getsource(item))
        for item in items
    )


def source_digest(sources) -> str:
    """:func:`code_digest` of source texts (one module's, or several in order)."""
    import ast

    digest = hashlib.sha256()
    for source in sources:
        tree = ast.parse(source)
        for node in ast.walk(tree):
            body = getattr(node, "body", None)
            first = body[0] if isinstance(body, list) and body else None
            if (
                isinstance(first, ast.Expr)
                and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)
            ):
                node.body = body[1:] or [ast.Pass()]
        digest.update(ast.dump(tree).encode())
    return digest.hexdigest()[:16]


def discard_checkpoint(directory: Path) -> None:
    """Remove a finished training's checkpoint (call after the model is saved)."""
    shutil.rmtree(directory, ignore_errors=True)


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
