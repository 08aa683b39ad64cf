"""Hard-image selection (issue 13): the epoch plan, the choice of images, the loss record, resuming, compute."""

from __future__ import annotations

import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf

from fmnist import training
from fmnist.pipeline import PROGRESS_LINE
from fmnist.recipes import Recipe

HARD = {
    "architecture": "bn_cnn",
    "width": 4,
    "stages": [1, 1, 1],
    "batch_size": 64,
    "epochs": 4,
    "patience": 0,
    "schedule": "cosine",
    "warmup_epochs": 1,
    "shift_pixels": 1,
    "precision": "float32",
    "dropout_rate": 0.0,
    "hard_share": 0.3,
    "hard_plain_epochs": 2,
}


def _bands(count: int = 640, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % 10
    images = rng.random((count, 28, 28, 1), dtype=np.float32) * 0.2
    for label in range(10):  # Each class lights up its own band of rows.
        images[labels == label, 2 * label + 4 : 2 * label + 7] += 0.8
    return images, labels


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"hard_share": 1.0}, r"hard_share=1.0 must be in \[0, 1\)"),
        ({"hard_share": 0.3, "hard_rest_share": 1.5}, r"hard_rest_share=1.5 must be in \[0, 1\]"),
        ({"hard_share": 0.3, "hard_plain_epochs": 0}, "hard_plain_epochs=0 must be at least 1"),
        ({"hard_share": 0.3, "epochs": 3, "hard_plain_epochs": 3}, "hard_plain_epochs=3 must be .* below epochs=3"),
    ],
)
def test_hard_image_fields_are_checked(values, message):
    with pytest.raises(ValueError, match=message):
        Recipe.from_params("bad", values)


def test_the_epoch_plan_spends_the_budget_of_images_seen_without_passing_it():
    plain = Recipe.from_params("plain", {"epochs": 16})
    assert training.epoch_plan(plain, 54_000) == [54_000] * 16
    hard = Recipe.from_params("hard", {"epochs": 16, "batch_size": 128, "hard_share": 0.3})
    plan = training.epoch_plan(hard, 54_000)
    # 3 epochs of every image, then 30 % + 20 % of the other 70 % = 44 % of the images per epoch.
    assert plan[:3] == [54_000] * 3 and set(plan[3:]) == {23_760}
    assert len(plan) == 32 and sum(plan) == 851_040 <= 16 * 54_000 < sum(plan) + 23_760
    steps = training.plan_steps(hard, 54_000)
    assert steps[:3] == [422] * 3 and steps[3:] == [186] * 29


def test_a_hard_image_epoch_keeps_the_highest_losses_and_draws_the_rest_from_the_seed():
    recipe = Recipe.from_params("hard", {"epochs": 4, "hard_share": 0.3, "hard_rest_share": 0.5})
    losses = np.random.default_rng(0).random(1000)
    chosen = training.hard_selection(losses, recipe, seed=7, epoch=3)
    hardest = set(np.argsort(-losses)[:300])
    assert len(chosen) == training.selected_images(recipe, 1000) == 300 + 350
    assert len(set(chosen)) == len(chosen) and hardest <= set(chosen)
    assert not np.array_equal(np.sort(chosen[:300]), np.sort(list(hardest)))  # The epoch's order is shuffled.
    np.testing.assert_array_equal(chosen, training.hard_selection(losses, recipe, seed=7, epoch=3))
    assert set(chosen) != set(training.hard_selection(losses, recipe, seed=7, epoch=4))
    assert set(chosen) != set(training.hard_selection(losses, recipe, seed=8, epoch=3))


def test_the_training_step_records_each_images_loss_where_the_batch_says():
    images, labels = _bands(64)
    recipe = Recipe.from_params("hard", HARD)
    model = training.build(recipe, len(labels), seed=0)
    assert isinstance(model, training.HardImageModel)
    index = np.arange(10, 42, dtype=np.int32)  # Half the images, by their positions in the training set.
    targets = training.one_hot(labels[index])
    batch = tf.data.Dataset.from_tensors((images[index], targets, index))
    before = keras.ops.convert_to_numpy(model.network(images[index], training=True))
    model.fit(batch, epochs=1, shuffle=False, verbose=0)
    recorded = np.asarray(model.last_loss)
    expected = keras.losses.categorical_crossentropy(targets, before).numpy()
    np.testing.assert_allclose(recorded[index], expected, rtol=1e-4)  # The loss the step computed, per image.
    untouched = np.setdiff1d(np.arange(64), index)
    assert np.all(recorded[untouched] == 1e9)  # Not trained on yet: the hardest.


def test_a_hard_image_training_runs_its_plan_hands_back_the_network_and_counts_the_images_it_saw(
    tmp_path, tensorboard_log, capsys
):
    images, labels = _bands(640)
    recipe = Recipe.from_params("hard", HARD)
    logs = tmp_path / "tensorboard"
    fitted = training.fit(
        recipe, images, labels, images[:100], labels[:100], seed=0, callbacks=[training.TensorBoard(logs)], verbose=0
    )
    plan = training.epoch_plan(recipe, 640)  # 2 x 640, then at most 2 x 640 in epochs of 192 + 90 = 282.
    assert plan == [640, 640, 282, 282, 282, 282] and fitted.images_per_epoch == plan
    assert not isinstance(fitted.model, training.HardImageModel)
    assert fitted.model.predict(images[:2], verbose=0).shape == (2, 10)
    assert fitted.epochs_run == 6 and len(fitted.history["val_loss"]) == 6
    assert len(fitted.history["epoch_seconds"]) == 6
    summary = fitted.summary(recipe, 640)
    assert summary["compute"]["images_seen"] == sum(plan) == 2408
    assert summary["compute"]["flops"] == 6 * summary["multiply_adds"] * 2408
    assert summary["hard_images"]["selected_epochs"] == 4
    assert summary["hard_images"]["images_per_selected_epoch"] == 282
    # Per class, the 192 images of the highest loss at the end (rebuilt from a fresh training's record: same seed).
    rebuilt = training.build(recipe, 640, seed=0)
    rebuilt.last_loss.assign(np.where(labels == 3, 5.0, 1.0).astype(np.float32))  # Class 3 is the hardest.
    assert training.hardest_images_per_class(rebuilt, labels, recipe) == [15, 15, 14, 64, 14, 14, 14, 14, 14, 14]
    assert summary["hard_images"]["hardest_per_class"] == training.hardest_images_per_class(
        _trained(recipe, images, labels), labels, recipe
    )
    # The callbacks saw one training of six epochs: one curve, a point per epoch.
    assert [step for step, _ in tensorboard_log.scalars(logs / "train", "epoch_loss")] == [0, 1, 2, 3, 4, 5]
    again = training.fit(recipe, images, labels, images[:100], labels[:100], seed=0, verbose=2)
    assert again.history["val_loss"] == fitted.history["val_loss"]  # The seed decides every choice.
    # Its progress: two lines per epoch, as Keras prints them, which `fmnist run` shows.
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "Epoch 1/6" and printed[-2] == "Epoch 6/6" and len(printed) == 12
    assert printed[-1].startswith("5/5 - ") and "282 images (the hardest and others)" in printed[-1]
    assert all(PROGRESS_LINE.match(line) for line in printed)


def _trained(recipe, images, labels):
    """The HardImageModel a fit of ``recipe`` on ``images`` trains (``fit`` hands back only its network)."""
    model = training.build(recipe, len(labels), seed=0)
    training.fit(recipe, images, labels, images[:100], labels[:100], seed=0, model=model, verbose=0)
    return model


def test_a_hard_image_training_resumed_from_its_checkpoint_selects_the_same_images(tmp_path):
    images, labels = _bands(640)
    recipe = Recipe.from_params("hard", HARD)

    class Killed(Exception):
        pass

    class KillInTheFourthEpoch(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 3:  # Two plain epochs and one hard-image epoch are done and checkpointed.
                raise Killed

    whole = training.fit(recipe, images, labels, images[:100], labels[:100], seed=0, verbose=0)
    with pytest.raises(Killed):
        training.fit(
            recipe,
            images,
            labels,
            images[:100],
            labels[:100],
            seed=0,
            checkpoint_dir=tmp_path,
            callbacks=[KillInTheFourthEpoch()],
            verbose=0,
        )
    resumed = training.fit(
        recipe, images, labels, images[:100], labels[:100], seed=0, checkpoint_dir=tmp_path, verbose=0
    )
    assert resumed.resumed_at == 3
    assert resumed.history["val_loss"] == whole.history["val_loss"]
    for left, right in zip(whole.model.get_weights(), resumed.model.get_weights(), strict=True):
        np.testing.assert_array_equal(left, right)


def test_hard_image_selection_cannot_train_in_rounds_or_on_a_plain_network():
    images, labels = _bands(64)
    recipe = Recipe.from_params("hard", HARD)
    with pytest.raises(ValueError, match="cannot train in rounds"):
        training.fit(recipe, images, labels, images, labels, seed=0, epochs=2, verbose=0)
    plain = training.build(dataclasses.replace(recipe, hard_share=0.0), len(labels), seed=0)
    with pytest.raises(ValueError, match="must come from training.build for this recipe"):
        training.fit(recipe, images, labels, images, labels, seed=0, model=plain, verbose=0)


def test_the_cosine_decay_ends_with_the_plans_last_step():
    recipe = Recipe.from_params("hard", {**HARD, "learning_rate": 0.01, "hard_rest_share": 0.0})
    steps = training.plan_steps(recipe, 640)  # [10, 10, 3, 3, 3, 3, 3, 3]: 38 steps, fewer than 4 full epochs' 40.
    assert steps == [10, 10, 3, 3, 3, 3, 3, 3]
    schedule = training.learning_rate_schedule(recipe, steps[0], sum(steps))
    assert float(schedule(10)) == pytest.approx(0.01, rel=1e-3)  # The warm-up's one full epoch.
    assert float(schedule(sum(steps) - 1)) > 0.0 and float(schedule(sum(steps))) == pytest.approx(0.0, abs=1e-9)
    # The model build() gives follows that schedule: its rate after 37 steps is the schedule's at step 37.
    model = training.build(recipe, 640, seed=0)
    model.optimizer.iterations.assign(sum(steps) - 1)
    assert float(model.optimizer.learning_rate) == pytest.approx(float(schedule(sum(steps) - 1)))
    # A plain recipe's schedule is what it was: epochs x steps per epoch.
    plain = dataclasses.replace(recipe, hard_share=0.0)
    assert training.plan_steps(plain, 640) == [10] * 4
    assert float(training.learning_rate_schedule(plain, 10)(39)) > 0.0
    assert float(training.learning_rate_schedule(plain, 10)(40)) == pytest.approx(0.0, abs=1e-9)


def test_early_stopping_works_through_the_hard_image_epochs():
    images, labels = _bands(640)
    # Validation images unlike the training ones: their loss soon rises, and patience 1 stops the training.
    noise = np.random.default_rng(5).random((100, 28, 28, 1), dtype=np.float32)
    recipe = Recipe.from_params("hard", {**HARD, "patience": 1, "epochs": 8, "learning_rate": 0.01})
    fitted = training.fit(recipe, images, labels, noise, labels[:100], seed=0, verbose=0)
    planned = len(training.epoch_plan(recipe, 640))
    assert fitted.epochs_run < planned  # Stopped early.
    assert fitted.best_epoch == int(np.argmin(fitted.history["val_loss"])) + 1 == fitted.epochs_run - 1
    assert fitted.images_per_epoch == training.epoch_plan(recipe, 640)[: fitted.epochs_run]


def test_a_hard_image_final_fit_learns_from_soft_targets_with_label_smoothing():
    images, labels = _bands(640)
    soft = 0.9 * training.one_hot(labels) + 0.01
    recipe = Recipe.from_params("hard_final", {**HARD, "label_smoothing": 0.1})
    fitted = training.fit(recipe, images, soft, None, None, seed=0, verbose=0)  # No validation: a final fit.
    assert "val_loss" not in fitted.history and fitted.epochs_run == len(training.epoch_plan(recipe, 640))
    assert fitted.summary(recipe, 640)["validation"] is None
    # The recorded loss is the step's: cross-entropy against the smoothed soft targets, not the labels.
    model = training.build(recipe, 64, seed=0)
    index = np.arange(32, dtype=np.int32)
    batch = tf.data.Dataset.from_tensors((images[index], soft[index], index))
    before = keras.ops.convert_to_numpy(model.network(images[index], training=True))
    model.fit(batch, epochs=1, shuffle=False, verbose=0)
    expected = keras.losses.categorical_crossentropy(soft[index], before, label_smoothing=0.1).numpy()
    np.testing.assert_allclose(np.asarray(model.last_loss)[index], expected, rtol=1e-4)


def test_too_small_a_selection_is_refused_before_anything_trains():
    recipe = Recipe.from_params("tiny", {**HARD, "hard_share": 0.001, "hard_rest_share": 0.0})
    with pytest.raises(ValueError, match="select no image of 100; give larger shares or more training images"):
        training.epoch_plan(recipe, 100)


def test_a_search_refuses_a_hard_image_recipe():
    from fmnist import tuning

    with pytest.raises(ValueError, match="search over the recipe with hard_share: 0"):
        tuning.SearchRequest(
            recipe=Recipe.from_params("hard", HARD).as_dict(),
            search_space={"learning_rate": [1e-3]},
            seed=0,
            validation_size=100,
        )


def test_the_results_and_the_report_count_the_images_a_hard_image_run_saw():
    from fmnist import report, results

    run = {
        "train_images": 1000,
        "epochs_run": 10,
        "multiply_adds": 10,
        "precision": "float32",
        "compute": {"images_seen": 4000, "flops": 6 * 10 * 4000, "tflops": 2.4e-7},
        "hard_images": {"selected_epochs": 8, "images_per_selected_epoch": 250, "hardest_per_class": [30] * 10},
    }
    assert results.images_seen(run) == 4000
    older = {key: value for key, value in run.items() if key not in ("compute", "hard_images")}
    assert results.images_seen(older) == 10_000  # Before it was recorded: every image in every epoch.
    assert results.training_tflops(older) == pytest.approx(6 * 10 * 10_000 / 1e12)
    assert "hard-image selection: 4,000 images seen, 4.0 passes" in report.compute_line(run)
    assert "passes" not in report.compute_line({**run, "hard_images": None})
