"""Recipes, the stronger network family, calibration, and the experiment tables."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from fmnist import evaluation, experiments, results, training
from fmnist.config import ExperimentsLayout
from fmnist.model import SEED_PARAMETER_COUNT, build_network, multiply_adds
from fmnist.recipes import Recipe, recipes_from_params


def test_recipe_defaults_are_the_seed_architecture_with_its_tuned_values():
    recipe = Recipe.from_params("baseline", {})
    assert (recipe.architecture, recipe.learning_rate, recipe.batch_size) == ("seed", 1e-3, 64)
    assert recipe.dropout_rate == 0.5
    assert (recipe.epochs, recipe.patience, recipe.schedule, recipe.augments) == (10, 3, "constant", False)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"learning_rte": 0.1}, "Did you mean 'learning_rate'"),
        ({"epochs": "ten"}, "give a int"),
        ({"horizontal_flip": 1}, "give a bool"),
        ({"epochs": True}, "give a int"),
        ({"schedule": "linear"}, "schedule='linear'"),
        ({"dropout_rate": 1.0}, r"dropout_rate=1.0 must be in \[0, 1\)"),
        ({"epochs": 0}, "epochs=0 must be positive"),
        ({"width": 64}, "the seed architecture is fixed"),
        ({"architecture": "resnet"}, "architecture='resnet'"),
        ({"stages": [1, "two"]}, "give a tuple"),
        ({"architecture": "bn_cnn", "head": "dense"}, "head='dense' is not one of gap, flatten"),
        ({"head": "flatten"}, "the seed architecture is fixed"),
        ({"quantisation_aware_epochs": -1}, "quantisation_aware_epochs=-1 must not be negative"),
        ({"quantisation_aware_learning_rate": 0.0}, "quantisation_aware_learning_rate=0.0 must be positive"),
        ({"consistency_weight": -1.0}, "consistency_weight=-1.0 must not be negative"),
        ({"tta_shifts": 14}, "tta_shifts=14 must be between 0 and 13"),
    ],
)
def test_recipe_rejects_bad_fields_with_the_fix(values, message):
    with pytest.raises(ValueError, match=message):
        Recipe.from_params("bad", values)


def test_ablations_change_one_field_of_their_base():
    main, varied = recipes_from_params(
        {"strong": {"architecture": "bn_cnn", "width": 8, "horizontal_flip": True, "learning_rate": 3e-3}},
        {"strong_no_flip": {"horizontal_flip": False}},
        "strong",
    )
    assert varied[0].name == "strong_no_flip"
    assert not varied[0].horizontal_flip
    assert (varied[0].architecture, varied[0].width, varied[0].learning_rate) == ("bn_cnn", 8, 3e-3)
    with pytest.raises(ValueError, match="ablation_base='missing'"):
        recipes_from_params({"strong": {}}, {"x": {}}, "missing")
    with pytest.raises(ValueError, match="reuse recipe names"):
        recipes_from_params({"strong": {}}, {"strong": {}}, "strong")


def test_plan_resolves_tuned_recipes_and_checks_seeds(tmp_path):
    tuning = tmp_path / "best.json"
    tuning.write_text(json.dumps({"learning_rate": 1e-4, "batch_size": 128, "dropout_rate": 0.3}))
    runs, main, varied = experiments.plan(
        {"tuned": {"tuned": True}, "fixed": {}},
        {"fixed_flip": {"horizontal_flip": True}},
        "fixed",
        [1, 2],
        [1],
        tuning_result=tuning,
    )
    assert [(recipe.name, seed) for recipe, seed in runs] == [
        ("tuned", 1),
        ("tuned", 2),
        ("fixed", 1),
        ("fixed", 2),
        ("fixed_flip", 1),
    ]
    assert (main[0].learning_rate, main[0].batch_size, main[0].dropout_rate) == (1e-4, 128, 0.3)
    assert main[1].learning_rate == 1e-3
    with pytest.raises(ValueError, match="seeds="):
        experiments.plan({"a": {}}, {}, "a", [], [1], tuning_result=tuning)


def test_bn_cnn_family_is_small_and_cheap_next_to_the_seed():
    seed = build_network("seed")
    assert seed.count_params() == SEED_PARAMETER_COUNT
    # The seed's cost, by hand: its three convolutions and two dense layers.
    assert multiply_adds(seed) == 26 * 26 * 32 * 9 + 11 * 11 * 64 * 288 + 3 * 3 * 64 * 576 + 576 * 256 + 256 * 10
    strong = build_network("bn_cnn", dropout_rate=0.2, width=32, stages=(1, 1, 1))
    assert strong.output_shape == (None, 10)
    assert strong.count_params() < seed.count_params()
    without_bn = build_network("bn_cnn", width=32, stages=(1, 1, 1), batch_norm=False)
    assert not any("bn" in layer.name for layer in without_bn.layers)
    with pytest.raises(ValueError, match="the seed architecture is fixed"):
        build_network("seed", width=8)
    # The flatten head feeds all 7x7 positions of the last 128 channels to the softmax.
    flatten = build_network("bn_cnn", width=32, stages=(1, 1, 1), head="flatten")
    assert multiply_adds(flatten) - multiply_adds(strong) == 7 * 7 * 128 * 10 - 128 * 10


def test_shifts_move_whole_pixels_without_blurring():
    recipe = Recipe.from_params("shift", {"shift_pixels": 2})
    images = np.zeros((64, 28, 28, 1), dtype=np.float32)
    images[:, 10:18, 10:18] = 1.0
    augmented = np.asarray(training.augment_batch(tf.constant(images), recipe, tf.constant([0, 1], tf.int64)))
    # Nearest-pixel shifts keep every pixel black or white; interpolation would leave greys.
    assert set(np.unique(augmented)) <= {0.0, 1.0}
    assert np.all(augmented.sum(axis=(1, 2, 3)) == 64.0)  # The 8x8 square is moved, never cut.
    assert len({tuple(np.argwhere(image[..., 0])[0]) for image in augmented}) > 5


def test_tta_views_are_the_image_its_mirror_and_four_one_pixel_shifts():
    from fmnist.data import tta_view_count, tta_views

    images = np.zeros((3, 28, 28, 1), dtype=np.float32)
    images[:, 5, 9] = 1.0
    views = tta_views(images, 1)
    assert len(views) == tta_view_count(1) == 10 and len(tta_views(images)) == tta_view_count(0) == 2
    np.testing.assert_array_equal(views[0], images)
    np.testing.assert_array_equal(views[1], images[:, :, ::-1])
    # Up, down, left, right by one whole pixel, each followed by its mirror image.
    where = [tuple(np.argwhere(view[0, ..., 0])[0]) for view in views]
    assert where[2::2] == [(4, 9), (6, 9), (5, 8), (5, 10)]
    assert where[3::2] == [(4, 18), (6, 18), (5, 19), (5, 17)]
    # A shift fills with black and cuts what leaves the frame.
    edge = np.zeros((1, 28, 28, 1), dtype=np.float32)
    edge[0, 0, :] = 1.0
    assert tta_views(edge, 1)[2].sum() == 0.0 and tta_views(edge, 1)[4][0, 1].sum() == 28.0


def test_predict_averages_every_tta_view():
    model = build_network("bn_cnn", width=4, stages=(1, 1, 1))
    images = np.random.default_rng(0).random((6, 28, 28, 1), dtype=np.float32)
    plain, flip = experiments.predict(model, images)
    _, shifted = experiments.predict(model, images, shifts=1)
    from fmnist.data import tta_views

    each = [model.predict(view, verbose=0) for view in tta_views(images, 1)]
    np.testing.assert_allclose(plain, each[0], rtol=1e-5)
    # Two views: exactly the arithmetic distillation targets were made with before shifts existed.
    np.testing.assert_array_equal(flip, (plain + model.predict(images[:, :, ::-1], batch_size=1000, verbose=0)) / 2)
    np.testing.assert_allclose(shifted, np.mean(each, axis=0), rtol=1e-5)
    assert not np.allclose(shifted, flip)


def test_augmentation_flips_left_right_only_and_keeps_shapes():
    recipe = Recipe.from_params("flip", {"horizontal_flip": True})
    images = np.zeros((64, 28, 28, 1), dtype=np.float32)
    images[:, :, :14] = 1.0  # Left half bright.
    augmented = np.asarray(training.augment_batch(tf.constant(images), recipe, tf.constant([0, 1], tf.int64)))
    assert augmented.shape == images.shape
    flipped = augmented[:, :, 14:].mean(axis=(1, 2, 3)) == 1.0
    assert 0 < flipped.sum() < 64  # Some images mirrored, some not.
    # Never upside down: every row keeps its content.
    np.testing.assert_array_equal(augmented[:, 0], augmented[:, 27])
    # Stateless: the same (seed, step) gives the same batch, the next step another.
    again = training.augment_batch(tf.constant(images), recipe, tf.constant([0, 1], tf.int64))
    following = training.augment_batch(tf.constant(images), recipe, tf.constant([0, 2], tf.int64))
    np.testing.assert_array_equal(augmented, again)
    assert not np.array_equal(augmented, following)


def test_random_erasing_blacks_out_one_rectangle_of_the_documented_size():
    recipe = Recipe.from_params("erase", {"erasing": 1.0})
    images = np.ones((200, 28, 28, 1), dtype=np.float32)
    erased = 1 - np.asarray(training.augment_batch(tf.constant(images), recipe, tf.constant([0, 1], tf.int64)))
    fractions = erased.reshape(200, -1).mean(axis=1)
    assert fractions.min() >= 1 / 784 and fractions.max() <= 0.4
    for image in erased[:20, :, :, 0]:
        rows, columns = np.nonzero(image)
        # One solid rectangle: its bounding box is entirely erased.
        assert image[rows.min() : rows.max() + 1, columns.min() : columns.max() + 1].all()


def test_calibration_of_known_predictions():
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    probabilities = np.zeros((8, 10))
    # Four predictions at confidence 0.9, three of them right; four at 0.6, all right.
    probabilities[:4, 0], probabilities[:4, 1] = 0.9, 0.1
    probabilities[3] = 0
    probabilities[3, 2], probabilities[3, 0] = 0.9, 0.1
    probabilities[4:, 1], probabilities[4:, 3] = 0.6, 0.4
    result = evaluation.calibration(labels, probabilities, bins=10)
    assert result["ece"] == pytest.approx(0.5 * abs(0.75 - 0.9) + 0.5 * abs(1.0 - 0.6))
    assert [b["count"] for b in result["bins"]] == [4, 4]
    perfect = np.eye(10)[labels]
    assert evaluation.calibration(labels, perfect)["ece"] == 0.0


def _fake_run(name, seed, accuracy, loss, *, tta=False, **recipe_fields):
    recipe = Recipe.from_params(name, {"tta": tta, **recipe_fields}).as_dict()
    scores = {"accuracy": accuracy, "loss": loss, "ece": 0.02, "reliability": []}
    return {
        "recipe": recipe,
        "seed": seed,
        "parameters": 1000,
        "multiply_adds": 5000,
        "train_images": 600,
        "epochs_run": 10,
        "train_seconds": 60.0,
        "validation": {"accuracy": accuracy + 0.01, "loss": loss},
        "test": scores,
        "test_without_tta": {**scores, "accuracy": accuracy - 0.01},
        "test_with_tta": scores,
    }


def test_summary_means_and_standard_deviations_over_seeds():
    runs = [_fake_run("a", 1, 0.90, 0.30), _fake_run("a", 2, 0.92, 0.26), _fake_run("b", 1, 0.95, 0.2)]
    runs[0]["validation_tta"] = {"accuracy_without": 0.91, "accuracy_with": 0.92}
    runs[1]["validation_tta"] = {"accuracy_without": 0.92, "accuracy_with": 0.92}
    latency = {"a_int8.tflite": {"p50_ms": 0.3, "tta_p50_ms": 0.6, "size_bytes": 2048}}
    rows = {row["recipe"]: row for row in results.summarise(runs, latency)}
    assert rows["a"]["seeds"] == 2
    assert rows["a"]["test_accuracy_mean"] == pytest.approx(0.91)
    assert rows["a"]["test_accuracy_std"] == pytest.approx(np.std([0.90, 0.92], ddof=1))
    assert rows["a"]["litert_int8_p50_ms"] == 0.3 and rows["a"]["litert_int8_kb"] == 2.0
    assert rows["a"]["validation_accuracy_mean"] == pytest.approx(0.92)
    # 6 FLOPs per multiply-add per image seen: 6 x 5,000 x 600 x 10 epochs.
    assert rows["a"]["training_tflops_mean"] == pytest.approx(6 * 5000 * 600 * 10 / 1e12)
    assert rows["a"]["precision"] == ["float32"] and rows["a"]["achieved_gflops_mean"] is None
    assert rows["b"]["test_accuracy_std"] == 0.0 and rows["b"]["litert_int8_p50_ms"] is None
    assert rows["a"]["test_accuracy_without_tta_mean"] == pytest.approx(0.90)
    table = results.results_table(list(rows.values()))
    assert table.loc["a", "accuracy without / with TTA"] == "0.9000\u00a0/\u00a00.9100"
    assert table.loc["a", "test accuracy"] == "0.9100\u00a0±\u00a00.0141"
    # Mean of +1 and 0 points; runs recorded before validation TTA existed show n/a.
    assert table.loc["a", "TTA gain on validation (points)"] == "+0.50"
    assert table.loc["b", "TTA gain on validation (points)"] == "n/a"
    comparison = results.comparison_rows(list(rows.values()), baseline="a", strong="b")
    assert comparison[0]["test_accuracy"] == 0.90 and comparison[0]["source"] == "seed.md"
    table = results.comparison_table(comparison)
    assert list(table["source"])[-1] == "published" and list(table["test_loss"])[-1] == ""
    assert comparison[2]["model"].startswith("our stronger model: b (mean of 1 seeds)")
    assert any(row["test_accuracy"] == 0.954 for row in comparison)
    with_study = results.comparison_rows(list(rows.values()), baseline="a", study="a", strong="b")
    labels = [row["model"].split(":")[0] for row in with_study[1:4]]
    assert labels == ["our baseline", "the study's recipe", "our stronger model"]


def test_a_recipe_with_shifted_tta_reports_the_latency_of_all_ten_views():
    runs = [_fake_run("shifty", 1, 0.9, 0.3, tta=True, tta_shifts=1), _fake_run("plain", 1, 0.9, 0.3)]
    latency = {
        "shifty_int8.tflite": {"p50_ms": 0.02, "tta_p50_ms": 0.04, "shift_tta_p50_ms": 0.2, "size_bytes": 1024},
        "plain_int8.tflite": {"p50_ms": 0.02, "tta_p50_ms": 0.04, "shift_tta_p50_ms": 0.2, "size_bytes": 1024},
    }
    rows = {row["recipe"]: row for row in results.summarise(runs, latency)}
    assert rows["shifty"]["litert_int8_p50_ms"] == 0.2 and rows["plain"]["litert_int8_p50_ms"] == 0.02
    table = results.results_table(list(rows.values()))
    assert list(table["TTA"]) == ["10 views", "no (2 views measured)"]


def test_ablation_rows_compare_on_shared_seeds_and_toggle_tta():
    runs = [
        _fake_run("full", 1, 0.93, 0.25, tta=True, horizontal_flip=True),
        _fake_run("full", 2, 0.99, 0.05, tta=True, horizontal_flip=True),  # Not an ablation seed: ignored.
        _fake_run("full_no_flip", 1, 0.92, 0.27, tta=True),
    ]
    # The base ran before these fields existed: they held their defaults, which the ablation keeps.
    for field in ("separable_stages", "quantisation_aware_epochs", "consistency_weight"):
        del runs[0]["recipe"][field]
    ablations = [Recipe.from_params("full_no_flip", {"tta": True})]
    rows = results.ablation_rows(runs, "full", ablations)
    assert [row["change"] for row in rows] == ["none (the full recipe)", "TTA removed", "horizontal_flip=False"]
    assert rows[0]["test_accuracy"] == 0.93
    assert rows[1]["accuracy_change"] == pytest.approx(-0.01)
    assert rows[2]["accuracy_change"] == pytest.approx(-0.01)


def test_a_finished_run_is_kept_and_a_changed_recipe_retrains(tmp_path, monkeypatch):
    recipe = Recipe.from_params("a", {})
    stored = _fake_run("a", 1, 0.9, 0.3)
    del stored["recipe"]["head"]  # Stored before the field existed: its default is what the run used.
    files = ExperimentsLayout(tmp_path)
    path = files.run(recipe.name, 1)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(stored))
    trained = []
    monkeypatch.setattr(experiments, "run_one", lambda recipe, seed, **_: trained.append((recipe.name, seed)) or stored)
    messages = []
    kept, missing = experiments.run_all([(recipe, 1)], files=files, progress=messages.append)
    assert trained == [] and "kept" in messages[0] and kept == [stored] and missing == []
    changed = Recipe.from_params("a", {"epochs": 2})
    _, missing = experiments.run_all([(changed, 1)], files=files, train_missing=False, progress=messages.append)
    assert trained == [] and missing == ["a seed 1"]
    experiments.run_all([(changed, 1)], files=files, progress=messages.append)
    assert trained == [("a", 1)] and "recipe changed" in messages[-3]
    # A run of another split is not kept either; one recorded before the split was is taken to match.
    stored["split"] = {"validation_size": 6000, "train_subset": 0}
    path.write_text(json.dumps(stored))
    settings = {"validation_size": 6000, "train_subset": 0}
    experiments.run_all([(recipe, 1)], files=files, progress=messages.append, **settings)
    assert trained == [("a", 1)] and "kept" in messages[-1]
    settings["validation_size"] = 5000
    experiments.run_all([(recipe, 1)], files=files, progress=messages.append, **settings)
    assert trained == [("a", 1), ("a", 1)]
    assert "the split changed (validation_size 6000 -> 5000) since; retraining" in messages[-3]


def test_a_kept_run_from_an_older_export_scheme_is_re_exported_when_its_model_is_on_disk(tmp_path):
    from fmnist import export

    recipe = Recipe.from_params("tiny", {"architecture": "bn_cnn", "width": 4, "stages": [1, 1, 1]})
    stored = _fake_run("tiny", 1, 0.9, 0.3, architecture="bn_cnn", width=4, stages=[1, 1, 1])
    stored["litert_files"] = {"float32": "tiny_float32.tflite", "int8": "tiny_int8.tflite"}
    stored["litert_sha256"] = {"float32": "old", "int8": "old"}  # Made by full-integer int8, before the scheme.
    files = ExperimentsLayout(tmp_path)
    path = files.run(recipe.name, 1)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(stored))
    models = files.models
    messages = []
    images = np.random.default_rng(0).random((40, 28, 28, 1), dtype=np.float32)
    labels = np.arange(40) % 10

    def rerun():
        return experiments.run_all(
            [(recipe, 1)],
            files=files,
            progress=messages.append,
            x_test=images,
            y_test=labels,
            x_train_full=np.concatenate([images, images]),
            y_train_full=np.concatenate([labels, labels]),
            validation_size=20,
        )

    kept, _ = rerun()
    # Neither its files nor its model on disk: nothing stale to replace, nothing to say.
    assert kept == [stored] and "kept" in messages[-1] and not models.exists()
    # A fresh clone has the committed int8 file but not the model: kept as it is, and the log says why.
    models.mkdir()
    (models / "tiny_int8.tflite").write_bytes(b"an older export")
    kept, _ = rerun()
    assert kept == [stored] and "not on disk" in messages[-1]
    build_network("bn_cnn", width=4, stages=(1, 1, 1)).save(files.model("tiny", 1))
    kept, _ = rerun()
    assert "re-exported" in messages[-1]
    rewritten = json.loads(path.read_text())
    assert rewritten["litert_export"] == export.EXPORT_SCHEME and kept == [rewritten]
    assert rewritten["litert_sha256"]["int8"] == experiments.file_digest(models / "tiny_int8.tflite")
    assert rewritten["test"] == stored["test"]  # The training's results are untouched.
    # Each file is measured as served: the float32 export gives the Keras model's probabilities back.
    served = rewritten["litert_served"]
    assert (
        served["float32"]["probability_difference"]["p99"] < 1e-5
        and served["int8"]["probability_difference"]["images"] == 40
    )
    assert 0 <= served["int8"]["test_accuracy"] <= 1
    # And on the seed's validation split, which the shipping rule reads.
    assert served["int8"]["validation_probability_difference"]["images"] == 20
    assert served["float32"]["validation_probability_difference"]["p99"] < 1e-5
    before = (models / "tiny_int8.tflite").stat().st_mtime_ns
    rerun()
    assert "kept" in messages[-1] and (models / "tiny_int8.tflite").stat().st_mtime_ns == before  # Current now.
    # A run of the current scheme recorded before the validation figures were gets them on the next run.
    del rewritten["litert_served"]["int8"]["validation_probability_difference"]
    path.write_text(json.dumps(rewritten))
    rerun()
    assert "re-exported" in messages[-1]
    assert "validation_probability_difference" in json.loads(path.read_text())["litert_served"]["int8"]


def test_a_recipe_changed_only_in_its_evaluation_is_evaluated_again_not_retrained(tmp_path, monkeypatch):
    network = {"architecture": "bn_cnn", "width": 4, "stages": [1, 1, 1]}
    files = ExperimentsLayout(tmp_path)
    files.models.mkdir()
    teacher_run = _fake_run("tiny", 1, 0.9, 0.3, tta=True, **network)
    student_run = _fake_run("pupil", 1, 0.9, 0.3, teacher="tiny", **network)
    teacher_path = files.run("tiny", 1)
    student_path = files.run("pupil", 1)
    teacher_path.parent.mkdir(parents=True)
    teacher_path.write_text(json.dumps(teacher_run))
    student_run["teacher"] = {"recipe": "tiny", "run_sha256": experiments.file_digest(teacher_path)}
    student_path.parent.mkdir(parents=True)
    student_path.write_text(json.dumps(student_run))
    for name in ("tiny", "pupil"):
        build_network("bn_cnn", width=4, stages=(1, 1, 1)).save(files.model(name, 1))
    trained, messages = [], []
    monkeypatch.setattr(
        experiments,
        "run_one",
        lambda recipe, seed, **_: trained.append(recipe.name) or {"test": {"accuracy": 0.9, "loss": 0.3}},
    )
    images = np.random.default_rng(0).random((40, 28, 28, 1), dtype=np.float32)
    labels = np.arange(40) % 10

    def rerun(shifts, *, students=True, train_missing=True, teacher_tta=True):
        teacher = Recipe.from_params("tiny", {**network, "tta": teacher_tta, "tta_shifts": shifts})
        student = Recipe.from_params("pupil", {**network, "teacher": "tiny", "tta_shifts": shifts})
        return experiments.run_all(
            [(teacher, 1), (student, 1)] if students else [(teacher, 1)],
            files=files,
            train_missing=train_missing,
            progress=messages.append,
            x_test=images,
            y_test=labels,
            x_train_full=np.concatenate([images, images]),
            y_train_full=np.concatenate([labels, labels]),
            validation_size=20,
        )

    # Summarising only (train_missing=False) writes nothing and keeps the evaluation recorded.
    original = experiments.file_digest(teacher_path)
    kept, missing = rerun(1, train_missing=False)
    assert missing == [] and kept == [teacher_run, student_run] and experiments.file_digest(teacher_path) == original
    assert "summarised as recorded" in messages[-1]
    # A pass that stops after the teacher: its file is rewritten, and says what it was.
    kept, _ = rerun(1, students=False)
    assert trained == []
    assert any("evaluated again (tta_shifts 0 -> 1)" in message for message in messages)
    teacher_now = json.loads(teacher_path.read_text())
    assert kept == [teacher_now] and teacher_now["rewritten_from"] == [original]
    assert teacher_now["recipe"]["tta_shifts"] == 1 and teacher_now["validation_tta"]["views"] == 10
    # Its test figures use the 10 views (tta); those without TTA stay as the run recorded them.
    assert teacher_now["test"] == teacher_now["test_with_tta"] != teacher_now["test_without_tta"]
    assert teacher_now["test_without_tta"] == teacher_run["test_without_tta"]
    assert teacher_now["validation"] == teacher_run["validation"] and teacher_now["train_seconds"] == 60.0
    # A summary-only pass then re-points the student in what it reports, but writes nothing.
    student_bytes = student_path.read_bytes()
    kept, missing = rerun(1, train_missing=False)
    assert missing == [] and student_path.read_bytes() == student_bytes
    assert kept[1]["teacher"]["run_sha256"] == experiments.file_digest(teacher_path)
    # The next pass finds the student pointing at the old file: the same teacher model taught it, so it is
    # re-pointed at the rewritten file and evaluated again, not retrained.
    kept, _ = rerun(1)
    student_now = json.loads(student_path.read_text())
    assert trained == [] and kept == [json.loads(teacher_path.read_text()), student_now]
    assert student_now["teacher"]["run_sha256"] == experiments.file_digest(teacher_path)
    assert student_now["test"] == student_now["test_without_tta"] == student_run["test_without_tta"]
    assert student_now["validation_tta"]["views"] == 10
    # Once current, a pass rewrites nothing.
    digests = [experiments.file_digest(path) for path in (teacher_path, student_path)]
    messages.clear()
    rerun(1)
    assert trained == [] and all(message.endswith("kept (seed1.json)") for message in messages)
    assert [experiments.file_digest(path) for path in (teacher_path, student_path)] == digests
    # Toggling tta alone needs no model (both figures are recorded), as on a fresh clone.
    files.model("tiny", 1).unlink()
    rerun(1, teacher_tta=False)
    toggled = json.loads(teacher_path.read_text())
    assert trained == [] and toggled["test"] == toggled["test_without_tta"] and not toggled["recipe"]["tta"]
    # Other views without its model on disk cannot be evaluated: it is retrained.
    rerun(0)
    assert trained[0] == "tiny"
    assert any("its evaluation changed and its model is not on disk" in message for message in messages)


def test_a_recipe_search_only_tunes_training_fields():
    from fmnist import tuning

    recipe = Recipe.from_params("strong", {"architecture": "bn_cnn", "width": 8}).as_dict()
    with pytest.raises(ValueError, match=r"search space \['width'\]"):
        tuning.SearchRequest(recipe=recipe, search_space={"width": [8, 16]})
    with pytest.raises(ValueError, match=r"search space \[\]"):
        tuning.SearchRequest(recipe=recipe, search_space={})
    with pytest.raises(ValueError, match="non-empty list"):
        tuning.SearchRequest(recipe=recipe, search_space={"learning_rate": 0.1})


def test_the_seeds_contradiction_is_settled_by_the_measured_means():
    rows = results.summarise([_fake_run("stated", 1, 0.88, 0.33), _fake_run("tuned", 1, 0.90, 0.30)])
    settled = results.contradiction(rows, stated="stated", tuned="tuned")
    assert settled["accuracy_difference"] == pytest.approx(0.02)
    assert results.contradiction(rows, stated="missing", tuned="tuned") is None
    from fmnist.report import experiments_block

    text = experiments_block(
        {
            "recipes": rows,
            "baseline": "tuned",
            "study": "tuned",
            "strong": "stated",
            "contradiction": settled,
            "missing_runs": ["x seed 1"],
        }
    )
    assert "**tuned** is better by 2.00 points" in text and "Incomplete" in text
    assert "- **The study's recipe, tuned**: test accuracy 0.9000" in text


def test_a_short_bn_cnn_run_predicts_as_well_at_inference_as_in_training():
    """Batch norm's moving statistics must settle within a short run (a search trial, a smoke run).

    With Keras' default momentum (0.99) 60 steps leave them far from the batch statistics and the
    inference-mode model answers one class for everything.
    """
    rng = np.random.default_rng(0)
    labels = np.arange(1280) % 10
    images = rng.random((1280, 28, 28, 1), dtype=np.float32) * 0.2
    for label in range(10):  # Each class lights up its own band of rows.
        images[labels == label, 2 * label + 4 : 2 * label + 7] += 0.8
    recipe = Recipe.from_params(
        "short", {"architecture": "bn_cnn", "width": 8, "epochs": 3, "patience": 0, "dropout_rate": 0.0}
    )
    fitted = training.fit(recipe, images, labels, images[:200], labels[:200], seed=0, verbose=0)
    inference = (fitted.model.predict(images, verbose=0).argmax(axis=1) == labels).mean()
    in_training = (np.asarray(fitted.model(images, training=True)).argmax(axis=1) == labels).mean()
    assert in_training > 0.9
    assert inference > in_training - 0.1, (inference, in_training)


def test_latency_of_models_not_on_disk_is_kept(tmp_path, monkeypatch):
    files = ExperimentsLayout(tmp_path)
    out, models = files.latency, files.models
    out.write_text(json.dumps({"old_int8.tflite": {"p50_ms": 0.3}, "new_int8.tflite": {"p50_ms": 9.9}}))
    models.mkdir()
    # A fresh clone: no models, so nothing is measured and the committed figures stay.
    assert experiments.measure_latency(files) == json.loads(out.read_text())
    (models / "new_int8.tflite").write_bytes(b"")

    def fake_latency_command(command, **_):
        out.write_text(json.dumps({"new_int8.tflite": {"p50_ms": 0.1}}))

    monkeypatch.setattr("subprocess.run", fake_latency_command)
    figures = experiments.measure_latency(files)
    assert figures == {"old_int8.tflite": {"p50_ms": 0.3}, "new_int8.tflite": {"p50_ms": 0.1}}
    assert json.loads(out.read_text()) == figures


def test_the_budget_comparison_ranks_both_grids_and_finds_the_seeds_point():
    import itertools

    import pandas as pd

    from fmnist.report import budget_block

    grid = list(itertools.product([1e-3, 1e-4, 1e-5], [32, 64, 128], [0.1, 0.3, 0.5]))
    rows = [dict(zip(results.GRID_FIELDS, point, strict=True)) for point in grid]
    # Cheap: learning rate decides everything, less dropout is better. Full: dropout 0.5 and batch 64 win.
    cheap = pd.DataFrame([{**r, "val_loss": -np.log10(r["learning_rate"]) + r["dropout_rate"]} for r in rows])
    full = pd.DataFrame(
        [
            {
                **r,
                "val_loss": -np.log10(r["learning_rate"]) - r["dropout_rate"] + abs(r["batch_size"] - 64) / 1000,
                "val_accuracy": 0.9,
                "best_epoch": 7,
            }
            for r in rows
        ]
    )
    comparison = results.budget_comparison(cheap, full)
    assert comparison["points"] == 27
    winner = comparison["full_winner"]
    assert (winner["learning_rate"], winner["batch_size"], winner["dropout_rate"]) == (1e-3, 64, 0.5)
    assert comparison["seed_point"]["rank_full"] == 1  # Here the seed's choice is the full-budget winner.
    assert comparison["cheap_winner"]["dropout_rate"] == 0.1 and comparison["cheap_winner"]["rank_cheap"] == 1
    assert 0 < comparison["spearman_rho"] < 1  # Learning rate agrees, dropout disagrees.
    text = budget_block(comparison)
    assert "ranks **1 of 27**" in text and "Spearman's rho" in text and "The study trains with it" in text
    assert "Not compared" in budget_block(None)
    with pytest.raises(ValueError, match="only 2 grid points"):
        results.budget_comparison(cheap.head(2), full)


def test_the_report_names_runs_an_earlier_training_path_produced(tmp_path):
    from fmnist.config import ArtifactLayout
    from fmnist.report import experiments_code_note

    layout = ArtifactLayout(tmp_path)
    files = layout.experiments
    current = {**_fake_run("new", 1, 0.9, 0.3), "training_code": training.training_code_version()}
    for name, seed, run in (("new", 1, current), ("old", 1, _fake_run("old", 1, 0.9, 0.3))):
        path = files.run(name, seed)
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(run))
    note = experiments_code_note(layout)
    assert "1 of 2 stored runs were trained by an earlier version" in note and "old (1)" in note
    # A check by fmnist verify-run vouches for the run only if it reproduced this file with this code.
    from fmnist.runs import file_digest

    old_path = files.run("old", 1)
    check = {
        "identical": True,
        "training_code": training.training_code_version(),
        "run_sha256": file_digest(old_path),
        "date": "2026-12-01",
    }
    check_path = files.verification("old", 1)
    for stale in ({"identical": False}, {"training_code": "older"}, {"run_sha256": "another file"}):
        check_path.parent.mkdir(parents=True, exist_ok=True)
        check_path.write_text(json.dumps({**check, **stale}))
        assert "1 of 2 stored runs were trained by an earlier version" in experiments_code_note(layout)
    # A run fine-tuned for int8 is vouched for only if the check's fine-tuning code is this code too.
    from fmnist.quantisation import fine_tuning_code_version

    run = json.loads(old_path.read_text())
    old_path.write_text(json.dumps({**run, "quantisation_aware": {"epochs": 1, "code": fine_tuning_code_version()}}))
    check["run_sha256"] = file_digest(old_path)
    check_path.write_text(json.dumps({**check, "fine_tuning_code": "older"}))
    assert "1 of 2 stored runs were trained by an earlier version" in experiments_code_note(layout)
    check["fine_tuning_code"] = fine_tuning_code_version()
    check_path.write_text(json.dumps(check))
    note = experiments_code_note(layout)
    assert "earlier version" not in note
    assert "1 stored run was retrained by this code and reproduced every figure exactly" in note
    assert "old seed 1 (2026-12-01)" in note
    check_path.unlink()
    old_path.unlink()
    assert experiments_code_note(layout) == ""
    # A run fine-tuned for int8 by other fine-tuning code is named too; one by this code is not.
    path = files.run("new", 1)
    path.write_text(json.dumps({**current, "quantisation_aware": {"epochs": 1, "code": "older"}}))
    assert "1 stored run was fine-tuned for int8 by an earlier version" in experiments_code_note(layout)
    path.write_text(json.dumps({**current, "quantisation_aware": {"epochs": 1, "code": fine_tuning_code_version()}}))
    assert experiments_code_note(layout) == ""


def test_a_recipe_with_nothing_to_fine_tune_for_int8_fails_before_it_trains(tmp_path, monkeypatch):
    recipe = Recipe.from_params(
        "tiny", {"architecture": "bn_cnn", "width": 2, "head": "gap", "quantisation_aware_epochs": 1}
    )
    monkeypatch.setattr(experiments, "fit", lambda *_, **__: pytest.fail("trained before refusing"))
    images = np.zeros((20, 28, 28, 1), dtype=np.float32)
    labels = np.arange(20) % 10
    with pytest.raises(ValueError, match="no layer that dynamic-range int8 quantises"):
        experiments.run_one(
            recipe,
            1,
            x_train_full=images,
            y_train_full=labels,
            x_test=images,
            y_test=labels,
            validation_size=10,
            train_subset=0,
            files=ExperimentsLayout(tmp_path),
        )


def test_the_code_a_measuring_child_process_runs_counts_in_the_stages_code(tmp_path):
    # A stage's code digest covers the fmnist modules loaded in its kernel (StageRun.finish reads sys.modules).
    # 05 and 06 measure in child processes (`fmnist latency`, `fmnist bench`): the code those measure with must
    # be loaded in the kernel too, so that changing it reruns the stage. A clean interpreter, the children stubbed.
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import subprocess, sys
        from pathlib import Path

        def child(command, **options):
            if "--json" in command:
                Path(command[command.index("--json") + 1]).write_text("{{}}")
            return subprocess.CompletedProcess(command, 0, "", "")

        subprocess.run = child
        from fmnist import experiments
        from fmnist.config import ArtifactLayout, ExperimentsLayout

        def loaded():
            names = ("fmnist.bench", "fmnist.inference", "fmnist.loadtest", "fmnist.serve")
            return sorted(name for name in names if name in sys.modules)

        experiments.measure_latency(ExperimentsLayout({str(tmp_path)!r}))
        print("06", loaded())
        from fmnist import deploy

        deploy.measure_latency_process([], 10, rounds=1)
        print("05 latency", loaded())
        deploy.run_benchmark_process(ArtifactLayout({str(tmp_path)!r}), seconds=1, clients=1, rate=1, runs=1)
        print("05 bench", loaded())
    """)
    printed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert [line for line in printed.splitlines() if line[:2] in ("06", "05")] == [
        "06 ['fmnist.bench', 'fmnist.inference']",
        "05 latency ['fmnist.bench', 'fmnist.inference']",
        "05 bench ['fmnist.bench', 'fmnist.inference', 'fmnist.loadtest', 'fmnist.serve']",
    ]


def test_latency_figures_include_every_tta_view_count(tmp_path):
    from fmnist import bench, export

    small = export.write_model(
        export.to_float32(build_network("bn_cnn", width=4, stages=(1, 1, 1))), tmp_path / "tiny_float32.tflite"
    )
    large = export.write_model(
        export.to_float32(build_network("bn_cnn", width=32, stages=(1, 1, 1))), tmp_path / "wide_float32.tflite"
    )
    images = np.random.default_rng(0).random((2, 28, 28, 1), dtype=np.float32)
    figures = bench.litert_latency([small, large], images, runs=20)
    for path in (small, large):
        # One call, two (flip TTA) and ten (flips of the image and its four shifts): each timed as it is served.
        measured = figures[path.name]
        assert measured["p50_ms"] > 0 and measured["tta_p50_ms"] > 0 and measured["shift_tta_p50_ms"] > 0
        assert measured["size_bytes"] == path.stat().st_size and measured["runs"] == 20
    # Each model's figures are its own, not the last one's timed (the wide one does 64 times the work per image).
    assert figures[large.name]["p50_ms"] > figures[small.name]["p50_ms"]


def test_latency_takes_the_models_in_turns_so_a_stall_falls_on_all_of_them():
    from fmnist import bench

    calls = []
    samples = bench.time_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 25, slices=5)
    assert [len(samples["a"]), len(samples["b"])] == [25, 25]
    timed = calls[40:]  # After each function's 20 warm-up calls.
    first_b, last_a = timed.index("b"), len(timed) - 1 - timed[::-1].index("a")
    assert first_b < last_a, "model a was timed to the end before model b started"
    assert timed.count("a") == timed.count("b") == 25 + 5 * 2  # Each turn opens with two warm-up calls.


def test_verify_run_retrains_a_stored_run_and_finds_what_differs(tmp_path):
    recipe = Recipe.from_params(
        "tiny", {"architecture": "bn_cnn", "width": 4, "stages": [1, 1, 1], "epochs": 1, "patience": 0, "tta": True}
    )
    rng = np.random.default_rng(0)
    images = rng.random((120, 28, 28, 1), dtype=np.float32)
    labels = np.arange(120) % 10
    arrays = {"x_train_full": images, "y_train_full": labels, "x_test": images[:30], "y_test": labels[:30]}
    files = ExperimentsLayout(tmp_path)
    experiments.run_one(recipe, 1, **arrays, validation_size=20, train_subset=0, files=files, verbose=0)
    stored_path = files.run(recipe.name, 1)
    stored = stored_path.read_bytes()
    record = experiments.verify_run("tiny", 1, files=files, scratch=tmp_path / "scratch", **arrays)
    assert record["identical"] and record["differences"] == [] and stored_path.read_bytes() == stored
    assert record["training_code"] == record["stored_training_code"]
    assert record["restored_model"] is None
    # A fresh clone has the run but not its model: a run that reproduces exactly gets it back with restore.
    model_file = files.model("tiny", 1)
    model_file.unlink()
    record = experiments.verify_run("tiny", 1, files=files, scratch=tmp_path / "restore", restore=True, **arrays)
    assert record["restored_model"] == model_file.name
    restored = keras.models.load_model(model_file)
    assert experiments.scores(labels[:30], restored.predict(images[:30], verbose=0))["accuracy"] == pytest.approx(
        json.loads(stored)["test_without_tta"]["accuracy"]
    )
    # A model already on disk is never replaced.
    before = model_file.read_bytes()
    record = experiments.verify_run("tiny", 1, files=files, scratch=tmp_path / "kept", restore=True, **arrays)
    assert record["restored_model"] is None and model_file.read_bytes() == before
    # A stored figure that the code no longer computes is found and named.
    tampered = json.loads(stored)
    tampered["test_with_tta"]["accuracy"] += 0.01
    tampered["history"]["loss"][0] += 0.01
    stored_path.write_text(json.dumps(tampered))
    record = experiments.verify_run("tiny", 1, files=files, scratch=tmp_path / "again", **arrays)
    assert not record["identical"] and record["differences"] == ["history", "test_with_tta"]
    # A run that does not reproduce never lends its retrained model.
    model_file.unlink()
    record = experiments.verify_run("tiny", 1, files=files, scratch=tmp_path / "differs", restore=True, **arrays)
    assert record["restored_model"] is None and not model_file.exists()
    assert record["split"] == {"validation_size": 20, "train_subset": 0, "final_fit": False, "recorded": True}
    with pytest.raises(FileNotFoundError, match="no stored run"):
        experiments.verify_run("missing", 1, files=files, scratch=tmp_path, **arrays)
