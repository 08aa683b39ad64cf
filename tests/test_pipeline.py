"""End to end: the smoke profile through every notebook, then assertions on what they wrote.

Like microsoft/recommenders, the notebooks are rerun with tiny parameters and
the test reads the metrics the notebooks themselves wrote.
"""

from __future__ import annotations

import json
import shutil

import pytest

from fmnist.cli import main
from fmnist.config import CLASS_NAMES, PARAMS_DIR, ArtifactLayout
from fmnist.pipeline import StageFailed, run_chain

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("smoke")
    result = run_chain(PARAMS_DIR / "smoke", out_dir, log_output=False)
    return result, ArtifactLayout(out_dir)


def test_every_stage_ran_and_was_timed(smoke_run):
    result, layout = smoke_run
    assert list(result.stage_seconds) == ["01_eda", "02_tune", "03_train", "04_evaluate", "05_deploy", "report"]
    for stage in result.stage_seconds:
        assert (layout.executed_notebooks / f"{stage}.ipynb").is_file()


def test_metrics_json_holds_what_the_report_needs(smoke_run):
    _, layout = smoke_run
    metrics = json.loads(layout.metrics.read_text())
    # One epoch on 2,000 images: far from good, far above chance (0.10).
    assert 0.45 < metrics["test_accuracy"] <= 1.0
    assert 0.0 < metrics["test_loss"] < 2.3
    assert metrics["test_size"] == 10_000
    assert set(metrics["per_class"]) == set(CLASS_NAMES)
    assert all(set(v) == {"precision", "recall", "f1", "support"} for v in metrics["per_class"].values())
    assert sum(map(sum, metrics["confusion_matrix"])) == 10_000
    assert metrics["seed_comparison"]["test_accuracy"]["seed"] == 0.90
    assert metrics["model"]["parameter_count"] == 206_026


def test_tuning_used_the_validation_split_and_training_used_its_result(smoke_run):
    _, layout = smoke_run
    trials = layout.tuning_trials.read_text().splitlines()
    assert len(trials) == 1 + 3
    best = json.loads(layout.best_hyperparameters.read_text())
    training = json.loads(layout.training_summary.read_text())
    assert training["hyperparameters"] == best
    assert training["hyperparameter_source"].startswith("tuning result")
    assert layout.model.is_file()


def test_manifest_records_versions_checksums_parameters_commit_and_times(smoke_run):
    _, layout = smoke_run
    manifest = json.loads(layout.manifest.read_text())
    assert manifest["packages"]["tensorflow"] and manifest["packages"]["keras-tuner"] == "1.4.8"
    assert "commit" in manifest["git"]
    assert manifest["stages"]["03_train"]["parameters"]["seed"] == 7
    assert manifest["stages"]["03_train"]["runner_wall_time_seconds"] > 0
    checksums = manifest["stages"]["01_eda"]["data"]["checksums"]
    assert checksums["train-images-idx3-ubyte"].startswith("c59f468a")


def test_report_is_one_self_contained_page_with_the_results(smoke_run):
    _, layout = smoke_run
    html = layout.report.read_text()
    metrics = json.loads(layout.metrics.read_text())
    assert f"{metrics['test_accuracy']:.4f}" in html
    for heading in (
        "Results on the test set",
        "Per-class precision",
        "Confusion matrix",
        "Training",
        "Tuning",
        "Deployment: size, latency, resources",
        "speed-up vs predict",
        "peak RSS",
        "Run manifest",
        "Executed notebooks",
    ):
        assert heading in html, heading
    assert "Shirt" in html and "c59f468a" in html
    assert html.count("data:image/png;base64") >= 10
    assert 'src="figures/' not in html
    assert "begin_stage" not in html  # Code is hidden.
    assert (layout.executed_notebooks / "03_train.html").is_file()
    assert 'href="notebooks/03_train.html"' in html


def test_deploy_exports_agree_with_keras_and_the_benchmark_wrote_its_figures(smoke_run):
    _, layout = smoke_run
    summary = json.loads(layout.deploy_summary.read_text())
    accuracy = {row["model"]: row for row in summary["accuracy"]}
    assert abs(accuracy["litert_float32"]["difference_points"]) <= 0.1
    assert abs(accuracy["litert_int8"]["difference_points"]) <= 0.5
    bench = json.loads(layout.bench.read_text())
    assert set(bench["latency"]) == {"keras_predict", "keras_call", "litert_float32", "litert_int8"}
    assert all(figures["p50_ms"] > 0 for figures in bench["latency"].values())
    sizes = bench["sizes_bytes"]
    assert sizes["litert_int8"] < sizes["litert_float32"] < sizes["keras"]
    serving = bench["serving"]
    assert serving["load"]["requests"] > 0 and serving["peak_rss_mb"] > 0
    assert serving["cold_start_to_first_answer_s"] > 0
    floor = bench["floor"]
    assert floor["multiply_adds"] == 2_906_752  # The seed CNN, counted layer by layer.
    # No engine beats the arithmetic floor; if one did, the floor (or the timing) would be wrong.
    assert 0 < floor["floor_ms"] < bench["latency"]["litert_float32"]["p50_ms"]


def test_a_failing_stage_names_itself_and_its_cell_and_keeps_the_notebook(tmp_path):
    profile = tmp_path / "broken"
    shutil.copytree(PARAMS_DIR / "smoke", profile)
    (profile / "03_train.yaml").write_text("epochs: 0\ntrain_subset: 200\n")
    with pytest.raises(
        StageFailed, match=r"stage 03_train failed in cell \d+ .*ValueError: .*epochs=0 must be positive"
    ) as error:
        run_chain(profile, tmp_path / "out", stages=("03_train",), log_output=False)
    assert "executed notebook kept" in str(error.value)
    assert (tmp_path / "out" / "notebooks" / "03_train.ipynb").is_file()
    assert not (tmp_path / "out" / "model" / "model.keras").exists()


def test_cli_rejects_a_mistyped_key_before_any_compute(tmp_path, capsys):
    profile = tmp_path / "typo"
    shutil.copytree(PARAMS_DIR / "smoke", profile)
    (profile / "02_tune.yaml").write_text("tunning_epochs: 1\n")
    assert main(["run", "--params", str(profile), "--out", str(tmp_path / "out"), "--quiet"]) == 1
    assert "unknown parameter 'tunning_epochs'. Did you mean 'tuning_epochs'?" in capsys.readouterr().err
    assert not (tmp_path / "out" / "notebooks").exists()


def test_experiments_stage_trains_every_recipe_and_seed_and_writes_the_tables(tmp_path):
    """The smoke experiments (two tiny recipes x two seeds, one ablation), then the files a report reads."""
    run_chain(PARAMS_DIR / "smoke", tmp_path, stages=("06_experiments",), log_output=False)
    layout = ArtifactLayout(tmp_path)
    summary = json.loads(layout.experiments_summary.read_text())
    rows = {row["recipe"]: row for row in summary["recipes"]}
    assert set(rows) == {"seed_tuned", "bn_cnn"}
    assert all(row["seeds"] == 2 for row in rows.values())
    # One epoch on 1,000 images: above chance, and two seeds give two different results.
    assert rows["seed_tuned"]["test_accuracy_mean"] > 0.3
    assert rows["seed_tuned"]["test_accuracy_std"] > 0
    assert rows["seed_tuned"]["parameters"] == 206_026
    assert 0 < rows["bn_cnn"]["litert_int8_p50_ms"] < 50 and rows["bn_cnn"]["litert_int8_kb"] > 1
    assert [row["change"] for row in summary["ablation"]][:2] == ["none (the full recipe)", "TTA removed"]
    assert summary["comparison"][0]["test_accuracy"] == 0.90
    assert set(summary["calibration"]) == {"seed_tuned", "bn_cnn"}
    assert len(list(layout.experiment_runs.glob("*/seed*.json"))) == 5
    for figure in ("experiments_accuracy_latency", "experiments_ablation", "experiments_reliability"):
        assert layout.figure(figure).is_file()
    # A rerun trains nothing: every run is on disk with the same recipe.
    before = {path: path.stat().st_mtime for path in layout.experiment_runs.glob("*/seed*.json")}
    run_chain(PARAMS_DIR / "smoke", tmp_path, stages=("06_experiments",), log_output=False)
    assert before == {path: path.stat().st_mtime for path in layout.experiment_runs.glob("*/seed*.json")}
