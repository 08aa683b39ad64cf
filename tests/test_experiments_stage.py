"""End to end: the smoke profile's 06_experiments stage, then assertions on the runs and tables it wrote.

Apart from test_pipeline.py (the rest of the chain), so that `make test`'s two workers can run the two at once.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from fmnist import results
from fmnist.config import PARAMS_DIR, ArtifactLayout
from fmnist.pipeline import run_chain

from library_noise import noisy_outputs

pytestmark = pytest.mark.slow


def test_experiments_stage_trains_every_recipe_and_seed_and_writes_the_tables(tmp_path):
    """The smoke experiments (two tiny recipes x two seeds, one ablation), then the files a report reads."""
    run_chain(PARAMS_DIR / "smoke", tmp_path, stages=("06_experiments",), echo="none")
    layout = ArtifactLayout(tmp_path)
    summary = json.loads(layout.experiments.summary.read_text())
    rows = {row["recipe"]: row for row in summary["recipes"]}
    assert set(rows) == {"seed_tuned", "bn_cnn", "bn_cnn_student", "bn_cnn_final", "bn_cnn_student_final"}
    assert all(row["seeds"] == 2 for row in rows.values())
    # The final fits trained on the training and validation images together, so they have no validation figures;
    # the student's learnt from the final fit of its teacher.
    final_student = json.loads(layout.experiments.run("bn_cnn_student_final", 7).read_text())
    assert final_student["validation"] is None and final_student["validation_tta"] is None
    assert final_student["split"]["final_fit"] and final_student["teacher"]["recipe"] == "bn_cnn_final"
    assert final_student["quantisation_aware"]["validation_before"] is None
    assert rows["bn_cnn_final"]["validation_accuracy_mean"] is None and rows["bn_cnn"]["validation_accuracy_mean"]
    # The student learnt from bn_cnn's model of its own seed.
    student = json.loads(layout.experiments.run("bn_cnn_student", 7).read_text())
    assert {key: student["teacher"][key] for key in ("recipe", "model", "seed")} == {
        "recipe": "bn_cnn",
        "model": "bn_cnn_seed7.keras",
        "seed": 7,
    }
    assert student["teacher"]["tflops"] > 0 and len(student["teacher"]["run_sha256"]) == 64
    assert rows["bn_cnn_student"]["teacher"] == "bn_cnn"
    # Then one quantisation-aware epoch, counted twice in its compute, and the model it left is what was measured.
    from fmnist import quantisation, training

    fine_tuning = student["quantisation_aware"]
    assert fine_tuning["epochs"] == 1 and len(fine_tuning["history"]["consistency"]) == 1
    assert fine_tuning["code"] == quantisation.fine_tuning_code_version()
    assert fine_tuning["flops"] == 2 * 6 * student["multiply_adds"] * student["train_images"]
    assert student["validation"]["accuracy"] == student["validation_tta"]["accuracy_without"]
    assert results.training_seconds(student) > student["train_seconds"]

    saved = training.load_model(layout.experiments.model("bn_cnn_student", 7))
    for name in quantisation.quantised_layers(saved):  # Saved as fine-tuned: its int8 weights on their grid.
        kernel = np.asarray(saved.get_layer(name).kernel)
        np.testing.assert_array_equal(quantisation.round_per_channel(kernel), kernel)
    assert results.training_tflops(student) == pytest.approx(
        student["compute"]["flops"] / 1e12 + fine_tuning["tflops"] + student["teacher"]["tflops"]
    )
    # Every run records its compute and the machine; the throughput probe timed float32 (and bf16 where native).
    assert all(row["training_tflops_mean"] > 0 and row["achieved_gflops_mean"] > 0 for row in rows.values())
    throughput = summary["throughput"]
    assert throughput["runs"]["float32_augmented"]["step_ms"] > 0 and 0 <= throughput["float32_augmentation_share"] < 1
    assert throughput["augmentation_ms"] > 0 and 0 < throughput["float32_augmentation_cost_share"] < 1
    # One epoch on 1,000 images: above chance, and two seeds give two different results.
    assert rows["seed_tuned"]["test_accuracy_mean"] > 0.3
    assert rows["seed_tuned"]["test_accuracy_std"] > 0
    assert rows["seed_tuned"]["parameters"] == 206_026
    assert 0 < rows["bn_cnn"]["litert_int8_p50_ms"] < 50 and rows["bn_cnn"]["litert_int8_kb"] > 1
    assert [row["change"] for row in summary["ablation"]][:2] == ["none (the full recipe)", "TTA removed"]
    assert summary["comparison"][0]["test_accuracy"] == 0.90
    assert set(summary["calibration"]) == {"seed_tuned", "bn_cnn"}
    assert len(layout.experiments.all_runs()) == 11
    # Every training logged its epochs for TensorBoard, in a directory of its own; so did the search's trials.
    logs = layout.tensorboard_dir / "06_experiments"
    runs = sorted(f"{path.parent.name}_{path.stem}" for path in layout.experiments.all_runs())
    assert sorted(path.name for path in logs.iterdir() if path.name != "search") == runs
    assert all(any((logs / run / "validation").iterdir()) for run in runs if "_final_" not in run)
    assert not any((logs / run / "validation").exists() for run in runs if "_final_" in run)
    search = json.loads(layout.experiments.search.read_text())
    assert len(list((logs / "search").glob("*/execution0/validation"))) == search["trials"] > 0
    for figure in (
        "experiments_accuracy_latency",
        "experiments_accuracy_compute",
        "experiments_ablation",
        "experiments_reliability",
    ):
        assert layout.figure(figure).is_file()
    assert not noisy_outputs(layout.executed_notebooks / "06_experiments.ipynb")
    # A rerun trains nothing: every run is on disk with the same recipe.
    before = {path: path.stat().st_mtime for path in layout.experiments.all_runs()}
    run_chain(PARAMS_DIR / "smoke", tmp_path, stages=("06_experiments",), echo="none")
    assert before == {path: path.stat().st_mtime for path in layout.experiments.all_runs()}
