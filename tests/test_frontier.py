"""Issue 13's training features: optimizers and warm-up, bfloat16 where native, compute budgets, distillation."""

from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import pytest

from fmnist import experiments, results, training
from fmnist.config import ExperimentsLayout
from fmnist.model import build_network, float32_copy, multiply_adds
from fmnist.recipes import Recipe, recipes_from_params
from fmnist.runs import file_digest


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"optimizer": "rmsprop"}, "optimizer='rmsprop' is not one of adam, sgd"),
        ({"precision": "float16"}, "precision='float16' is not one of auto, float32, bfloat16"),
        ({"warmup_epochs": 1, "schedule": "cosine", "epochs": 1}, "warmup_epochs=1 must be at least 0 and below"),
        ({"warmup_epochs": 1}, "warmup_epochs needs schedule: cosine"),
        ({"weight_decay": 1.5}, r"weight_decay=1.5 must be in \[0, 1\)"),
        ({"teacher": "bad"}, "a recipe cannot be its own teacher"),
        ({"teacher": "other", "teacher_weight": 0.0}, r"teacher_weight=0.0 must be in \(0, 1\]"),
        ({"temperature": 0}, "temperature=0 must be positive"),
    ],
)
def test_new_recipe_fields_are_checked(values, message):
    with pytest.raises(ValueError, match=message):
        Recipe.from_params("bad", values)


def test_a_teacher_must_be_a_recipe_trained_before_its_student():
    recipes = {"student": {"teacher": "strong"}, "strong": {}}
    with pytest.raises(ValueError, match="teacher 'strong' must be one of the recipes listed before it"):
        recipes_from_params(recipes, {}, "")
    main, _ = recipes_from_params({"strong": {}, "student": {"teacher": "strong"}}, {}, "")
    assert [recipe.name for recipe in main] == ["strong", "student"]


@pytest.mark.parametrize(
    ("features", "expected"),
    [(["avx2", "fma"], "float32"), (["avx2", "avx512f", "avx512_bf16"], "bfloat16"), (["amx_bf16"], "bfloat16")],
)
def test_auto_precision_is_bfloat16_only_where_the_cpu_has_native_bf16(monkeypatch, features, expected):
    from fmnist import manifest

    assert manifest.auto_precision(features) == expected
    here = manifest.machine()
    assert here["auto_precision"] == manifest.auto_precision(here["features"])
    monkeypatch.setattr(manifest, "machine", lambda: {"features": features, "auto_precision": expected})
    assert training.resolve_precision("auto") == expected
    assert training.resolve_precision("float32") == "float32"
    assert training.resolve_precision("bfloat16") == "bfloat16"


def test_the_machine_record_tells_cpu_generations_apart(monkeypatch, tmp_path):
    from fmnist import manifest

    # Two cores of a Zen 4 EPYC, as /proc/cpuinfo lists them: the name is the same as a Zen 3's.
    core = (
        "processor\t: {n}\ncpu family\t: 25\nmodel\t\t: 17\nmodel name\t: AMD EPYC\nstepping\t: 1\n"
        "flags\t\t: fpu avx2 fma avx512f avx512_bf16\n\n"
    )
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(core.format(n=0) + core.format(n=1))
    monkeypatch.setattr(manifest, "CPUINFO", str(cpuinfo))
    record = manifest.machine()
    assert (record["cpu"], record["family"], record["model"], record["stepping"]) == ("AMD EPYC", 25, 17, 1)
    assert record["features"] == ["avx2", "fma", "avx512f", "avx512_bf16"]
    assert manifest.describe_machine(record).startswith("AMD EPYC (family 25, model 17), ")
    # A record written before the numbers were kept still describes its machine by name.
    assert (
        manifest.describe_machine({"cpu": "AMD EPYC", "cores": 2, "features": ["avx2"]}) == "AMD EPYC, 2 cores (avx2)"
    )


def test_warmup_rises_linearly_into_the_cosine_decay():
    recipe = Recipe.from_params(
        "warm", {"epochs": 4, "warmup_epochs": 1, "schedule": "cosine", "learning_rate": 0.01, "precision": "float32"}
    )
    schedule = training.learning_rate_schedule(recipe, steps_per_epoch=10)
    rates = [float(schedule(step)) for step in (0, 5, 10, 25, 40)]
    assert rates[0] == pytest.approx(0.0)
    assert rates[1] == pytest.approx(0.005, rel=1e-3)
    assert rates[2] == pytest.approx(0.01, rel=1e-3)  # The peak, where the cosine begins.
    assert rates[2] > rates[3] > rates[4] >= 0.0
    sgd = training.compiled_network(Recipe.from_params("sgd", {"optimizer": "sgd", "weight_decay": 5e-4}), 10)
    assert sgd.optimizer.nesterov and sgd.optimizer.momentum == 0.9 and sgd.optimizer.weight_decay == 5e-4


def _bands(count: int = 640, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % 10
    images = rng.random((count, 28, 28, 1), dtype=np.float32) * 0.2
    for label in range(10):  # Each class lights up its own band of rows.
        images[labels == label, 2 * label + 4 : 2 * label + 7] += 0.8
    return images, labels


def _run_settings(tmp_path):
    """``run_one``'s data and directories: 700 banded training images (100 of them validation), 100 test images."""
    images, labels = _bands(700)
    test_images, test_labels = _bands(100, seed=1)
    return {
        "x_train_full": images,
        "y_train_full": labels,
        "x_test": test_images,
        "y_test": test_labels,
        "validation_size": 100,
        "train_subset": 0,
        "files": ExperimentsLayout(tmp_path),
        "verbose": 0,
    }


def test_a_bfloat16_training_hands_back_a_float32_network_and_records_its_compute():
    images, labels = _bands()
    recipe = Recipe.from_params(
        "bf16", {"architecture": "bn_cnn", "width": 8, "epochs": 2, "patience": 0, "precision": "bfloat16"}
    )
    import keras

    built = training.build(recipe, len(labels), seed=0)
    assert built.get_layer("stage1_conv1").dtype_policy.name == "mixed_bfloat16"
    assert built.get_layer("probabilities").dtype_policy.name == "float32"  # The softmax stays float32.
    assert keras.mixed_precision.global_policy().name == "float32"  # Nothing leaks into later models.
    fitted = training.fit(recipe, images, labels, images[:100], labels[:100], seed=0, verbose=0)
    assert fitted.precision == "bfloat16"
    assert {layer.dtype_policy.name for layer in fitted.model.layers} == {"float32"}
    assert fitted.model.predict(images[:4], verbose=0).dtype == np.float32
    summary = fitted.summary(recipe, len(labels))
    compute = summary["compute"]
    assert summary["precision"] == "bfloat16"
    assert compute["flops"] == 6 * summary["multiply_adds"] * len(labels) * 2
    assert compute["images_seen"] == 2 * len(labels)
    assert compute["achieved_gflops"] > 0 and compute["peak_gflops"] > 0
    assert compute["fraction_of_peak"] == pytest.approx(compute["achieved_gflops"] / compute["peak_gflops"], abs=0.002)


def test_the_float32_copy_keeps_the_weights_and_answers_like_the_mixed_network():
    import keras

    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        mixed = build_network("bn_cnn", dropout_rate=0.1, width=8, head="flatten")
    finally:
        keras.mixed_precision.set_global_policy("float32")
    images, _ = _bands(64)
    copy = float32_copy(mixed)
    assert [layer.dtype_policy.name for layer in mixed.layers][1] == "mixed_bfloat16"
    assert {layer.dtype_policy.name for layer in copy.layers} == {"float32"}
    assert all(np.array_equal(a, b) for a, b in zip(mixed.get_weights(), copy.get_weights(), strict=True))
    assert multiply_adds(copy) == multiply_adds(mixed)
    # bf16 keeps 8 bits of mantissa: the answers agree to about 1%, and exactly in float32.
    np.testing.assert_allclose(copy.predict(images, verbose=0), mixed.predict(images, verbose=0), atol=0.03)


def test_distillation_targets_soften_the_teachers_answers_and_keep_the_labels_share():
    images, labels = _bands(200)
    teacher = build_network("bn_cnn", dropout_rate=0.0, width=8, head="flatten")
    hot = Recipe.from_params("student", {"teacher": "t", "teacher_weight": 0.9, "temperature": 1.0})
    warm = Recipe.from_params("student", {"teacher": "t", "teacher_weight": 1.0, "temperature": 4.0})
    only = Recipe.from_params("student", {"teacher": "t", "teacher_weight": 1.0, "temperature": 1.0})
    targets = experiments.distillation_targets(teacher, images, labels, hot)
    softer = experiments.distillation_targets(teacher, images, labels, warm)
    teachers = experiments.distillation_targets(teacher, images, labels, only)
    assert targets.shape == (200, 10) and targets.dtype == np.float32
    np.testing.assert_allclose(targets.sum(axis=1), 1.0, atol=1e-5)
    # A tenth of every row is the label's one-hot row; the rest is the teacher's (flip-averaged) answer.
    np.testing.assert_allclose(targets - 0.9 * teachers, 0.1 * np.eye(10)[labels], atol=1e-5)
    _, mirrored = experiments.predict(teacher, images)
    np.testing.assert_allclose(teachers, mirrored, atol=1e-5)

    def entropy(rows):
        return float(-(rows * np.log(rows + 1e-12)).sum(axis=1).mean())

    assert entropy(softer) > entropy(teachers)  # A higher temperature moves every row towards uniform.


def test_a_student_trains_on_its_teachers_model_of_the_same_seed(tmp_path, tensorboard_log):
    common = {"architecture": "bn_cnn", "width": 8, "epochs": 1, "patience": 0, "precision": "float32"}
    teacher = Recipe.from_params("teacher", common)
    student = Recipe.from_params("student", {**common, "width": 4, "teacher": "teacher"})
    settings = {**_run_settings(tmp_path), "tensorboard_dir": tmp_path / "tensorboard"}
    files = settings["files"]
    with pytest.raises(FileNotFoundError, match="distils 'teacher', whose model .* is not on disk"):
        experiments.run_one(student, 3, **settings)
    experiments.run_one(teacher, 3, **settings)
    assert files.model("teacher", 3).is_file()
    result = experiments.run_one(student, 3, **settings)
    teacher_run = files.run(teacher.name, 3)
    assert {key: result["teacher"][key] for key in ("recipe", "model", "seed")} == {
        "recipe": "teacher",
        "model": "teacher_seed3.keras",
        "seed": 3,
    }
    assert result["teacher"]["run_sha256"] == file_digest(teacher_run)
    # The student's compute counts its teacher's training and its two predictions per training image.
    teacher_result = json.loads(teacher_run.read_text())
    expected = teacher_result["compute"]["flops"] + 4 * teacher_result["multiply_adds"] * 600
    assert result["teacher"]["tflops"] == pytest.approx(expected / 1e12)
    assert results.training_tflops(result) == pytest.approx((result["compute"]["flops"] + expected) / 1e12)
    assert 0.0 <= result["test"]["accuracy"] <= 1.0
    assert files.run(student.name, 3).is_file()
    # Each run logged its epochs for TensorBoard in a directory of its own, so the runs compare side by side.
    assert sorted(path.name for path in (tmp_path / "tensorboard").iterdir()) == ["student_seed3", "teacher_seed3"]
    validation = tensorboard_log.scalars(tmp_path / "tensorboard" / "student_seed3" / "validation", "epoch_loss")
    assert [step for step, _ in validation] == [0] and validation[0][1] == pytest.approx(
        result["history"]["val_loss"][0]
    )


def _candidate(name, architecture, validation, path):
    return {"name": name, "architecture": architecture, "validation_accuracy": validation, "seed": 1, "file": path}


def test_the_shipping_rule_takes_the_best_validation_accuracy_within_the_budgets(tmp_path):
    from fmnist import deploy

    files = {name: tmp_path / f"{name}_int8.tflite" for name in ("seed", "student", "slow", "big", "weak")}
    candidates = [
        _candidate("seed", "seed", 0.92, files["seed"]),
        _candidate("student", "bn_cnn", 0.935, files["student"]),
        _candidate("slow", "bn_cnn", 0.95, files["slow"]),  # Better, but 1.6x the seed's latency.
        _candidate("big", "bn_cnn", 0.96, files["big"]),  # Better and fast, but over 256 KB.
        _candidate("weak", "bn_cnn", 0.90, files["weak"]),
        _candidate("gone", "bn_cnn", 0.99, None),  # Not on disk: it cannot ship.
    ]
    candidates[1]["probability_p99"] = 0.02  # Shown beside the choice, not used in it.
    latency = {
        "seed_int8.tflite": {"p50_ms": 0.10, "size_bytes": 220_000},
        "student_int8.tflite": {"p50_ms": 0.14, "size_bytes": 80_000},
        "slow_int8.tflite": {"p50_ms": 0.16, "size_bytes": 100_000},
        "big_int8.tflite": {"p50_ms": 0.05, "size_bytes": 300_000},
        "weak_int8.tflite": {"p50_ms": 0.05, "size_bytes": 50_000},
    }
    choice = deploy.choose_shipped(candidates, latency, "seed")
    assert choice["shipped"] == "student" and choice["shipped_file"] == "student_int8.tflite"
    assert choice["budget_ms"] == pytest.approx(0.15)
    rows = {row["name"]: row for row in choice["candidates"]}
    assert rows["slow"]["reason"] == "over budget: 1.60x the reference latency"
    assert rows["big"]["reason"] == "over budget: 293 KB"
    assert not rows["gone"]["eligible"] and rows["gone"]["reason"] == "no int8 file on disk from its runs"
    assert rows["student"]["latency_ratio"] == pytest.approx(1.4)
    assert rows["student"]["probability_p99"] == 0.02 and rows["seed"]["probability_p99"] is None
    # With a looser budget the slower, better model ships; the size limit still holds.
    assert deploy.choose_shipped(candidates, latency, "seed", ratio=2.0)["shipped"] == "slow"
    assert choice["faithful_within_budget"] == 0 and rows["student"]["faithful"] is None
    # Once a candidate within budget serves its Keras model's probabilities faithfully on the validation images,
    # only the faithful ones may ship: the weaker but faithful model wins over the better one that is not.
    candidates[1]["validation_p99"] = 0.02
    candidates[4]["validation_p99"] = 0.008
    candidates[2]["validation_p99"] = 0.001  # Faithful, but over budget.
    choice = deploy.choose_shipped(candidates, latency, "seed")
    rows = {row["name"]: row for row in choice["candidates"]}
    assert choice["shipped"] == "weak" and choice["faithful_within_budget"] == 1
    assert rows["student"]["reason"] == "within budget, not faithful: validation p99 0.0200 > 0.01"
    assert (
        rows["seed"]["reason"]
        == "within budget, but its validation p99 was not measured (faithful models are preferred)"
    )
    assert rows["slow"]["reason"] == "over budget: 1.60x the reference latency"
    assert "within 0.01 of their Keras model's on the validation images" in choice["rule"]
    assert deploy.choose_shipped(candidates, latency, "seed", tolerance=0.05)["shipped"] == "student"
    with pytest.raises(ValueError, match="reference model 'gone' is not among the candidates on disk"):
        deploy.choose_shipped(candidates, latency, "gone")
    with pytest.raises(ValueError, match="no candidate is within"):
        deploy.choose_shipped(candidates, latency, "seed", ratio=0.1, max_bytes=10)


def test_a_student_is_retrained_when_its_teacher_was_and_a_missing_teacher_model_is_retrained_first(
    tmp_path, monkeypatch
):
    teacher = Recipe.from_params("teacher", {})
    student = Recipe.from_params("student", {"teacher": "teacher"})
    files = ExperimentsLayout(tmp_path)
    trained, logged = [], []

    def fake_run_one(recipe, seed, *, files, **_):
        trained.append(recipe.name)
        logged.append(_.get("tensorboard_dir"))
        record = {
            "recipe": recipe.as_dict(),
            "seed": seed,
            "version": len(trained),
            "test": {"accuracy": 0.9, "loss": 0.3},
        }
        if recipe.teacher:
            record["teacher"] = {"run_sha256": file_digest(files.run(teacher.name, seed))}
        path = files.run(recipe.name, seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record))
        files.model(recipe.name, seed).parent.mkdir(parents=True, exist_ok=True)
        files.model(recipe.name, seed).write_text("model")
        return record

    monkeypatch.setattr(experiments, "run_one", fake_run_one)
    plan = [(teacher, 1), (student, 1)]
    experiments.run_all(plan, files=files, progress=lambda _: None)
    assert trained == ["teacher", "student"]
    experiments.run_all(plan, files=files, progress=lambda _: None)
    assert trained == ["teacher", "student"]  # Nothing changed: both kept.
    # A fresh clone: the runs are committed, the models are not. The student is kept (its teacher's run is
    # the one it learnt from), so nothing trains.
    for path in files.models.iterdir():
        path.unlink()
    experiments.run_all(plan, files=files, progress=lambda _: None)
    assert trained == ["teacher", "student"]
    # The teacher's run changes (retrained elsewhere): the student is stale, and its teacher's model is
    # missing, so the teacher is retrained first, then the student.
    path = files.run(teacher.name, 1)
    path.write_text(path.read_text().replace('"version": 1', '"version": 9'))
    messages = []
    experiments.run_all(plan, files=files, progress=messages.append, tensorboard_dir=tmp_path / "tensorboard")
    assert trained == ["teacher", "student", "teacher", "student"]
    assert logged[-2:] == [tmp_path / "tensorboard"] * 2  # The retrained teacher logs too.
    assert any("its teacher was retrained since" in message for message in messages)
    assert any("retraining the teacher (no model on disk)" in message for message in messages)


def test_the_throughput_probe_times_a_recipe_with_a_warm_up():
    images, labels = _bands(512)
    recipe = Recipe.from_params(
        "probe",
        {
            "architecture": "bn_cnn",
            "width": 4,
            "epochs": 4,
            "warmup_epochs": 1,
            "schedule": "cosine",
            "shift_pixels": 2,
            "horizontal_flip": True,
            "batch_size": 64,
            "patience": 0,
        },
    )
    figures = experiments.measure_throughput(recipe, images, labels, steps=3, rounds=2)
    assert {"float32_augmented", "float32_plain"} <= set(figures["runs"])
    assert all(run["step_ms"] > 0 and run["gflops"] > 0 for run in figures["runs"].values())
    # Each configuration ran once per round, and the figure is its fastest round's median step.
    for run in figures["runs"].values():
        assert len(run["step_ms_rounds"]) == 2 and run["step_ms"] == pytest.approx(min(run["step_ms_rounds"]), abs=1e-3)
    assert 0.0 <= figures["float32_augmentation_share"] < 1.0
    # The augmentation timed on its own, and its cost as a share of the augmented step.
    assert figures["augmentation_ms"] > 0
    share = figures["augmentation_ms"] / figures["runs"]["float32_augmented"]["step_ms"]
    assert figures["float32_augmentation_cost_share"] == pytest.approx(share)
    plain = dataclasses.replace(recipe, shift_pixels=0, horizontal_flip=False)
    assert experiments.augmentation_ms(plain, images) == 0.0


def test_the_results_table_reads_a_summary_written_before_the_compute_columns():
    row = {
        "recipe": "old",
        "architecture": "seed",
        "seeds": 1,
        "tta": False,
        "test_accuracy_mean": 0.9,
        "test_accuracy_std": 0.0,
        "test_loss_mean": 0.3,
        "test_loss_std": 0.0,
        "ece_mean": 0.01,
        "test_accuracy_without_tta_mean": 0.9,
        "test_accuracy_with_tta_mean": 0.9,
        "validation_tta_gain_mean": None,
        "parameters": 10,
        "multiply_adds": 100,
        "epochs_run_mean": 1.0,
        "train_seconds_mean": 1.0,
        "litert_float32_p50_ms": None,
        "litert_int8_p50_ms": None,
        "litert_int8_kb": None,
    }
    table = results.results_table([row])
    assert table.loc["old", "precision"] == "float32" and np.isnan(table.loc["old", "training (TFLOP)"])
    assert table.loc["old", "images seen (passes)"] == 1.0


def test_shipping_candidates_use_each_recipes_mean_validation_and_only_the_file_its_run_exported(tmp_path):
    from fmnist import deploy

    experiments_dir = tmp_path / "experiments"
    (experiments_dir / "models").mkdir(parents=True)
    (experiments_dir / "summary.json").write_text(
        json.dumps(
            {"recipes": [{"recipe": "good", "architecture": "bn_cnn"}, {"recipe": "swapped", "architecture": "bn_cnn"}]}
        )
    )
    for name, content in (("good", b"good model"), ("swapped", b"another run's model")):
        (experiments_dir / "models" / f"{name}_int8.tflite").write_bytes(content)
    exported_digest = file_digest(experiments_dir / "models" / "good_int8.tflite")
    for name in ("good", "swapped"):
        for seed, accuracy in ((42, 0.95), (43, 0.93)):
            run = {"seed": seed, "validation": {"accuracy": 0.0}, "validation_tta": {"accuracy_without": accuracy}}
            if seed == 42:
                run["litert_files"] = {"int8": f"{name}_int8.tflite"}
                run["litert_sha256"] = {"int8": exported_digest}  # "swapped"'s file on disk is not this one.
                run["litert_served"] = {
                    "int8": {
                        "probability_difference": {"p99": 0.02},
                        "validation_probability_difference": {"p99": 0.018},
                    }
                }
            path = experiments_dir / "runs" / name / f"seed{seed}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(run))
    read = []
    study = {"recipe": {"architecture": "seed"}, "validation": {"accuracy": 0.92}}
    candidates = deploy.shipping_candidates(
        tmp_path / "model_int8.tflite", study, experiments_dir, read.append, study_agreement={"p99": 0.015}
    )
    by_name = {candidate["name"]: candidate for candidate in candidates}
    assert by_name["study (03_train)"]["validation_accuracy"] == 0.92
    # How faithfully each file serves its Keras model: the study's from 05's check, a recipe's from its run.
    assert by_name["study (03_train)"]["probability_p99"] == 0.015 and by_name["good"]["probability_p99"] == 0.02
    assert by_name["swapped"]["probability_p99"] is None
    # The rule reads the same on the validation images; the study's model has no such figure.
    assert by_name["good"]["validation_p99"] == 0.018 and by_name["swapped"]["validation_p99"] is None
    assert by_name["study (03_train)"]["validation_p99"] is None
    assert by_name["good"]["validation_accuracy"] == pytest.approx(0.94)  # The mean over seeds, without TTA.
    assert by_name["good"]["file"] == experiments_dir / "models" / "good_int8.tflite" and by_name["good"]["seed"] == 42
    assert by_name["swapped"]["file"] is None  # On disk, but not the file its run exported.
    assert len(read) == 4  # Every run file that decided a figure is recorded as an input.


def test_a_teacher_re_exported_under_a_new_scheme_keeps_its_students(tmp_path, monkeypatch):
    teacher = Recipe.from_params("teacher", {})
    student = Recipe.from_params("student", {"teacher": "teacher"})
    files = ExperimentsLayout(tmp_path)
    teacher_path, student_path = files.run(teacher.name, 1), files.run(student.name, 1)
    for path in (teacher_path, student_path):
        path.parent.mkdir(parents=True)
    teacher_path.write_text(json.dumps({"recipe": teacher.as_dict(), "seed": 1, "litert_export": "older"}))
    student_record = {"recipe": student.as_dict(), "seed": 1, "teacher": {"run_sha256": file_digest(teacher_path)}}
    student_path.write_text(json.dumps(student_record))
    monkeypatch.setattr(experiments, "run_one", lambda *_, **__: pytest.fail("nothing needs training"))

    def fake_refresh(result, recipe, seed, files, x_test, y_test, validation_images):
        if result.get("litert_export") != "older":
            return ""
        result["litert_export"] = "newer"  # The files and their digests change; the training does not.
        experiments.write_json(files.run(recipe.name, seed), result)

    monkeypatch.setattr(experiments, "refresh_export", fake_refresh)
    messages = []
    plan = [(teacher, 1), (student, 1)]
    experiments.run_all(plan, files=files, progress=messages.append)
    assert json.loads(teacher_path.read_text())["litert_export"] == "newer"
    assert json.loads(student_path.read_text())["teacher"]["run_sha256"] == file_digest(teacher_path)
    assert any("its teacher's run was rewritten, not retrained" in message for message in messages)
    # The next run finds everything current: both kept, nothing rewritten.
    digests = (file_digest(teacher_path), file_digest(student_path))
    experiments.run_all(plan, files=files, progress=messages.append)
    assert (file_digest(teacher_path), file_digest(student_path)) == digests


def test_a_student_trained_after_its_teacher_was_re_exported_is_kept_on_the_next_run(tmp_path, monkeypatch):
    teacher = Recipe.from_params("teacher", {})
    student = Recipe.from_params("student", {"teacher": "teacher"})
    files = ExperimentsLayout(tmp_path)
    teacher_path = files.run(teacher.name, 1)
    teacher_path.parent.mkdir(parents=True)
    teacher_path.write_text(json.dumps({"recipe": teacher.as_dict(), "seed": 1, "litert_export": "older"}))
    files.models.mkdir()
    files.model("teacher", 1).write_text("model")  # On disk: the teacher is not retrained.
    trained = []

    def fake_run_one(recipe, seed, *, files, **_):
        trained.append(recipe.name)
        # As run_one does: the student names the teacher run file as it is when it learns from it.
        record = {"recipe": recipe.as_dict(), "seed": seed, "teacher": {"run_sha256": file_digest(teacher_path)}}
        record["test"] = {"accuracy": 0.9, "loss": 0.3}
        experiments.write_json(files.run(recipe.name, seed), record)
        return record

    def fake_refresh(result, recipe, seed, files, x_test, y_test, validation_images):
        if result.get("litert_export") != "older":
            return ""
        result["litert_export"] = "newer"
        experiments.write_json(files.run(recipe.name, seed), result)

    monkeypatch.setattr(experiments, "run_one", fake_run_one)
    monkeypatch.setattr(experiments, "refresh_export", fake_refresh)
    plan = [(teacher, 1), (student, 1)]
    experiments.run_all(plan, files=files, progress=lambda _: None)
    assert trained == ["student"] and json.loads(teacher_path.read_text())["litert_export"] == "newer"
    experiments.run_all(plan, files=files, progress=lambda _: None)
    assert trained == ["student"]  # The student learnt from the re-exported file: nothing is stale.


def test_summarising_what_is_on_disk_rewrites_nothing(tmp_path, monkeypatch):
    recipe = Recipe.from_params("a", {})
    files = ExperimentsLayout(tmp_path)
    path = files.run(recipe.name, 1)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"recipe": recipe.as_dict(), "seed": 1, "litert_export": "older"}))
    monkeypatch.setattr(experiments, "refresh_export", lambda *_: pytest.fail("train_missing=False re-exported"))
    kept, missing = experiments.run_all([(recipe, 1)], files=files, train_missing=False)
    assert len(kept) == 1 and missing == []


def test_a_final_fit_trains_on_every_training_image_and_records_no_validation_figures(tmp_path):
    common = {"architecture": "bn_cnn", "width": 4, "epochs": 1, "patience": 0, "precision": "float32"}
    judged, final = recipes_from_params({"judged": common, "final": {**common, "final_fit_of": "judged"}}, {}, "")[0]
    settings = _run_settings(tmp_path)
    split = experiments.run_one(judged, 3, **settings)
    result = experiments.run_one(final, 3, export=True, **settings)
    assert (split["train_images"], result["train_images"]) == (600, 700)
    assert result["validation"] is None and result["validation_tta"] is None
    assert "val_loss" not in result["history"] and result["epochs_run"] == 1
    assert result["split"]["final_fit"] is True and split["split"]["final_fit"] is False
    # Its compute counts every image it saw: all 700.
    assert result["compute"]["images_seen"] == 700
    # Its int8 file's agreement with its Keras model is still measured on the split's validation images.
    from fmnist import data, deploy

    x_val = data.train_validation_split(settings["x_train_full"], settings["y_train_full"], 100, 3)[2]
    keras_model = training.load_model(settings["files"].model("final", 3))
    expected = deploy.probability_agreement(
        settings["files"].litert_model("final", "int8"), x_val, keras_model.predict(x_val, verbose=0)
    )
    assert result["litert_served"]["int8"]["validation_probability_difference"] == pytest.approx(expected)
    summary = {row["recipe"]: row for row in results.summarise([split, result])}
    assert summary["final"]["validation_accuracy_mean"] is None
    assert summary["judged"]["validation_accuracy_mean"] == pytest.approx(split["validation"]["accuracy"])
    assert summary["final"]["validation_tta_gain_mean"] is None


@pytest.mark.parametrize(
    ("final", "message"),
    [
        ({"final_fit_of": "nowhere"}, "final_fit_of='nowhere' must name a recipe of this file"),
        ({"final_fit_of": "judged", "width": 8}, "only epochs, teacher may differ, not width 8 (not 4)"),
        ({"final_fit_of": "judged", "weight_decay": 0.1}, "not weight_decay 0.1 (not 0.0)"),
        ({"final_fit_of": "judged", "patience": 3}, "patience=3 stops early on the validation split"),
        ({"final_fit_of": "final"}, "a recipe cannot be the final fit of itself"),
    ],
)
def test_a_final_fit_must_refit_a_recipe_judged_on_validation_with_the_same_settings(final, message):
    common = {"architecture": "bn_cnn", "width": 4, "patience": 0}
    with pytest.raises(ValueError, match=re.escape(message)):
        recipes_from_params({"judged": common, "final": {**common, **final}}, {}, "")
    # The epochs may differ (the same compute on more images).
    recipes_from_params({"judged": common, "final": {**common, "final_fit_of": "judged", "epochs": 9}}, {}, "")


def test_only_a_final_fit_learns_from_a_final_fit_and_ablations_never_start_from_one():
    common = {"architecture": "bn_cnn", "width": 4, "patience": 0}
    recipes = {
        "teacher": common,
        "teacher_final": {**common, "final_fit_of": "teacher"},
        "student": {**common, "teacher": "teacher"},
        "student_final": {**common, "final_fit_of": "student", "teacher": "teacher_final"},
    }
    recipes_from_params(recipes, {}, "")
    # A student judged on its validation split must not learn from a teacher that trained on those images.
    with pytest.raises(ValueError, match="its teacher 'teacher_final' is a final fit"):
        recipes_from_params({**recipes, "leaky": {**common, "teacher": "teacher_final"}}, {}, "")
    # A final fit of a student learns from the final fit of the student's teacher, not from another.
    with pytest.raises(ValueError, match="learns from the final fit of its teacher \\(teacher\\), not from 'teacher'"):
        recipes_from_params({**recipes, "student_final": {**recipes["student_final"], "teacher": "teacher"}}, {}, "")
    with pytest.raises(ValueError, match="ablation_base='teacher_final' is a final fit"):
        recipes_from_params(recipes, {"no_flip": {"horizontal_flip": False}}, "teacher_final")
    for change in ({"teacher": "teacher_final"}, {"final_fit_of": "teacher"}):
        with pytest.raises(ValueError, match="can neither be a final fit nor learn from one"):
            recipes_from_params(recipes, {"changed": change}, "student")


def test_a_final_fit_is_judged_by_the_recipe_it_refits_and_ships_in_its_place(tmp_path):
    from fmnist import deploy

    experiments_dir = tmp_path / "experiments"
    (experiments_dir / "models").mkdir(parents=True)
    names = ("judged", "final", "orphan")
    # The final fit's own agreement on images it trained on flatters it: the rule takes the larger of it and the
    # refitted recipe's.
    p99 = {"judged": 0.008, "final": 0.003, "orphan": 0.005}
    (experiments_dir / "summary.json").write_text(
        json.dumps({"recipes": [{"recipe": name, "architecture": "bn_cnn"} for name in names]})
    )
    for name in names:
        model = experiments_dir / "models" / f"{name}_int8.tflite"
        model.write_bytes(name.encode())
        final_fit_of = {"final": "judged", "orphan": "missing"}.get(name, "")
        for seed, accuracy in ((42, 0.95), (43, 0.93)):
            run = {
                "seed": seed,
                "recipe": {"name": name, "final_fit_of": final_fit_of},
                "validation": None if final_fit_of else {"accuracy": accuracy},
                "validation_tta": None if final_fit_of else {"accuracy_without": accuracy},
            }
            if seed == 42:
                run["litert_files"] = {"int8": model.name}
                run["litert_sha256"] = {"int8": file_digest(model)}
                run["litert_served"] = {"int8": {"validation_probability_difference": {"p99": p99[name]}}}
            path = experiments_dir / "runs" / name / f"seed{seed}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(run))
    study = {"recipe": {"architecture": "seed"}, "validation": {"accuracy": 0.92}}
    candidates = deploy.shipping_candidates(tmp_path / "model_int8.tflite", study, experiments_dir)
    by_name = {candidate["name"]: candidate for candidate in candidates}
    # The final fit has no validation split: it is judged by the mean of the recipe it refits.
    assert by_name["final"]["validation_accuracy"] == pytest.approx(0.94) and by_name["final"]["judged_by"] == "judged"
    assert by_name["judged"]["judged_by"] is None and by_name["orphan"]["validation_accuracy"] is None
    assert by_name["final"]["validation_p99"] == 0.008 and by_name["judged"]["validation_p99"] == 0.008
    candidates[0]["file"] = tmp_path / "model_int8.tflite"
    latency = {f"{name}_int8.tflite": {"p50_ms": 0.12, "size_bytes": 100_000} for name in names}
    latency["model_int8.tflite"] = {"p50_ms": 0.1, "size_bytes": 200_000}
    choice = deploy.choose_shipped(candidates, latency, "study (03_train)")
    rows = {row["name"]: row for row in choice["candidates"]}
    # The same settings on more images: on the tie, the final fit ships; one judged by nothing cannot.
    assert choice["shipped"] == "final" and rows["final"]["judged_by"] == "judged"
    assert not rows["orphan"]["eligible"] and "the recipe it refits, missing, has none" in rows["orphan"]["reason"]
    assert "a final fit (trained on the validation split too)" in choice["rule"]
