"""End to end: the smoke profile through every notebook, then assertions on what they wrote.

Like microsoft/recommenders, the notebooks are rerun with tiny parameters and
the test reads the metrics the notebooks themselves wrote.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fmnist import pipeline, runs
from fmnist.cli import main
from fmnist.config import CLASS_NAMES, PARAMS_DIR, ArtifactLayout
from fmnist.pipeline import StageFailed, run_chain

from library_noise import LIBRARY_NOISE, noisy_outputs

SCREENSHOTS = Path(__file__).resolve().parents[1] / "build" / "page-screenshots"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """The smoke chain as a user starts it, at default verbosity: (what it printed, its artifacts)."""
    out_dir = tmp_path_factory.mktemp("smoke")
    finished = subprocess.run(
        [sys.executable, "-m", "fmnist", "run", "--params", str(PARAMS_DIR / "smoke"), "--out", str(out_dir)],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert finished.returncode == 0, finished.stdout + finished.stderr
    return finished.stdout + finished.stderr, ArtifactLayout(out_dir)


def test_every_stage_ran_and_was_timed(smoke_run):
    _, layout = smoke_run
    stages = json.loads(layout.manifest.read_text())["stages"]
    assert list(stages) == ["01_eda", "02_tune", "03_train", "04_evaluate", "05_deploy", "report"]
    for stage, entry in stages.items():
        assert (layout.executed_notebooks / f"{stage}.ipynb").is_file()
        assert entry["runner_wall_time_seconds"] > 0


def test_a_smoke_run_prints_progress_not_library_noise(smoke_run):
    printed, layout = smoke_run
    lines = printed.splitlines()
    assert 10 < len(lines) <= 150, printed
    assert not LIBRARY_NOISE.search(printed), LIBRARY_NOISE.search(printed)
    assert re.search(r"^  Epoch \d+/3$", printed, re.MULTILINE), printed
    # Nothing is lost: the libraries' own messages are in the stage logs.
    assert LIBRARY_NOISE.search((layout.root / "logs" / "03_train.log").read_text())


def test_executed_notebooks_carry_no_library_noise(smoke_run):
    _, layout = smoke_run
    notebooks = sorted(layout.executed_notebooks.glob("*.ipynb"))
    assert len(notebooks) == 6
    found = [line for notebook in notebooks for line in noisy_outputs(notebook)]
    assert not found, "\n".join(found)


def test_metrics_json_holds_what_the_report_needs(smoke_run):
    _, layout = smoke_run
    metrics = json.loads(layout.metrics.read_text())
    # Three epochs on 2,000 images: far from good, far above chance (0.10).
    assert 0.45 < metrics["test_accuracy"] <= 1.0
    assert 0.0 < metrics["test_loss"] < 2.3
    assert metrics["test_size"] == 10_000
    assert set(metrics["per_class"]) == set(CLASS_NAMES)
    assert all(set(v) == {"precision", "recall", "f1", "support"} for v in metrics["per_class"].values())
    assert sum(map(sum, metrics["confusion_matrix"])) == 10_000
    assert metrics["seed_comparison"]["test_accuracy"]["seed"] == 0.90
    assert metrics["model"]["parameters"] == 206_026


def test_tuning_used_the_validation_split_and_training_used_its_result(smoke_run):
    _, layout = smoke_run
    trials = layout.tuning_trials.read_text().splitlines()
    assert len(trials) == 1 + 3
    best = json.loads(layout.best_hyperparameters.read_text())
    training = json.loads(layout.training_summary.read_text())
    source = best.pop("source")
    assert source == "this search: grid, 1 epoch per trial"
    assert {key: training["recipe"][key] for key in best} == best
    assert training["hyperparameter_source"].startswith("tuning result")
    assert training["epochs_run"] == 3 and training["resumed_at_epoch"] == 0
    assert layout.model.is_file()


def test_trainings_log_to_tensorboard_in_the_run_and_no_stage_tracks_the_logs(smoke_run, tensorboard_log):
    _, layout = smoke_run
    logs = layout.tensorboard_dir
    # 03_train: one step per epoch, the values of its history.
    history = json.loads(layout.history.read_text())
    validation = tensorboard_log.scalars(logs / "03_train" / "validation", "epoch_loss")
    assert [step for step, _ in validation] == [0, 1, 2]
    assert [value for _, value in validation] == pytest.approx(history["val_loss"], rel=1e-5)
    assert [step for step, _ in tensorboard_log.scalars(logs / "03_train" / "train", "epoch_loss")] == [0, 1, 2]
    # 02_tune: one directory per trial, with the trial's values for the HParams dashboard.
    trials = pd.read_csv(layout.tuning_trials, dtype={"trial": str})
    assert sorted(path.name for path in (logs / "02_tune").iterdir()) == sorted(trials["trial"])
    for trial in trials.itertuples():
        hparams = tensorboard_log.hparams(logs / "02_tune" / trial.trial / "execution0")
        assert hparams["ended"] and hparams["learning_rate"] == pytest.approx(trial.learning_rate)
    # Published with the run, but no stage's input or output: they are git-ignored under reports/, and a
    # fresh clone without them must not rerun anything (see the rerun test below).
    for stage_manifest in (layout.root / "manifests").glob("*.json"):
        record = json.loads(stage_manifest.read_text())["run"]
        assert not [name for name in [*record["inputs"], *record["outputs"]] if name.startswith("tensorboard/")]


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
    # The smoke run ships its own tiny model, not the package's: the report says the package answers with another.
    assert "default model is another file" in html
    assert html.count("data:image/png;base64") >= 10
    assert 'src="figures/' not in html
    assert "begin_stage" not in html  # Code is hidden.
    assert (layout.executed_notebooks / "03_train.html").is_file()
    assert 'href="notebooks/03_train.html"' in html
    # Offline: no script or stylesheet from elsewhere, in the report or the stage pages.
    for page in (html, (layout.executed_notebooks / "03_train.html").read_text()):
        assert not re.search(r"""<(script|link)[^>]+(src|href)=["']https?://""", page)


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
    # The service benchmarked is the classifier that ships, not merely the study's export.
    assert serving["model"] == "shipped" and serving["file"] == layout.shipped_model.name
    assert serving["size_bytes"] == layout.shipped_model.stat().st_size
    assert serving["load"]["requests"] > 0 and serving["peak_rss_mb"] > 0
    assert serving["cold_start_to_first_answer_s"] > 0
    # The load test's phases: no 5xx for the hostile uploads, no errors under load, no tracebacks logged.
    assert serving["idle"]["p50_ms"] > 0 and serving["closed_loop"]["errors"] == 0
    assert serving["hostile"]["server_errors"] == 0 and sum(map(len, serving["hostile"]["statuses"].values())) > 0
    assert serving["slow"]["healthz"]["runs"] > 0 and serving["log_tracebacks"] == 0
    # The figures name the machine and the versions that made them.
    assert bench["machine"]["cpu"] and bench["machine"]["cores"] >= 1 and "features" in bench["machine"]
    assert all(bench["packages"][name] for name in ("tensorflow", "keras", "keras-tuner", "ai-edge-litert", "numpy"))
    floor = bench["floor"]
    assert floor["multiply_adds"] == 2_906_752  # The seed CNN, counted layer by layer.
    # No float32 engine beats the float32 arithmetic floor; if one did, the floor (or the timing) would be wrong.
    assert 0 < floor["floor_ms"] < bench["latency"]["litert_float32"]["p50_ms"]
    # The shipping rule, with the study's own model as the only candidate (the smoke profile names no experiments).
    shipping = json.loads(layout.shipping.read_text())
    assert shipping["shipped"] == shipping["reference"] == "study (03_train)"
    assert shipping["candidates"][0]["latency_ratio"] == 1.0 and shipping["budget_ms"] > 0
    assert layout.shipped_model.read_bytes() == layout.litert_model("int8").read_bytes()
    assert shipping["shipped_sha256"] == hashlib.sha256(layout.shipped_model.read_bytes()).hexdigest()
    assert shipping["shipped_test_accuracy"] == pytest.approx(accuracy["litert_int8"]["test_accuracy"])


def test_a_failing_stage_names_itself_and_its_cell_and_keeps_the_notebook(tmp_path):
    profile = tmp_path / "broken"
    shutil.copytree(PARAMS_DIR / "smoke", profile)
    (profile / "03_train.yaml").write_text("recipe: {epochs: 0}\ntrain_subset: 200\n")
    with pytest.raises(
        StageFailed, match=r"stage 03_train failed in cell \d+ .*ValueError: .*epochs=0 must be positive"
    ) as error:
        run_chain(profile, tmp_path / "out", stages=("03_train",), echo="none")
    assert "executed notebook kept" in str(error.value)
    # The failed run stays in its work directory for inspection and resumption; out/ is never written.
    assert (tmp_path / ".out.run" / "notebooks" / "03_train.ipynb").is_file()
    assert not (tmp_path / "out").exists()


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def _start(arguments: list[str]) -> subprocess.Popen:
    command = [sys.executable, "-m", "fmnist", "run", *arguments, "--quiet"]
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


def _kill_when(process: subprocess.Popen, condition, timeout: float = 600.0) -> None:
    """kill -9 the run and its kernels (its process group) as soon as ``condition()`` holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"the run ended before it could be killed:\n{process.stdout.read()}")
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting to kill the run")
        time.sleep(0.02)
    # The kernels run in sessions of their own (jupyter_client starts them so): kill every descendant
    # first, or a kernel would go on training for the second its parent-poller takes to notice.
    for pid in _descendants(process.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def _descendants(root: int) -> list[int]:
    """The process ids below ``root`` (children, their children, ...), read from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, queue = [], [root]
    while queue:
        for child in children.get(queue.pop(), []):
            found.append(child)
            queue.append(child)
    return found


def _finished_trials(work: Path) -> int:
    # keras-tuner writes trial.json in place: read it as text, which a half-written file cannot fool.
    return sum(
        '"status": "COMPLETED"' in path.read_text()
        for path in work.glob("tuning/keras_tuner/search_*/trial_*/trial.json")
    )


def test_kill_9_mid_trial_and_mid_epoch_leaves_out_untouched_and_resumes_to_the_same_model(smoke_run, tmp_path):
    """kill -9 during 02_tune (after one trial) and during 03_train (after one epoch); the resumed run
    ends with exactly the uninterrupted run's trials and model, and out/ never changes until then."""

    from fmnist import data, training

    _, reference = smoke_run
    profile = tmp_path / "profile"  # A profile of its own: the published set below is another profile's.
    shutil.copytree(PARAMS_DIR / "smoke", profile)
    out = tmp_path / "published"
    shutil.copytree(reference.root, out)
    before = _tree_digest(out)
    work = tmp_path / ".published.run"
    arguments = ["--params", str(profile), "--out", str(out), "--stage", "02_tune", "--stage", "03_train"]

    _kill_when(_start(arguments), lambda: _finished_trials(work) >= 1)
    done_at_kill = _finished_trials(work)
    assert 1 <= done_at_kill < 3 and _tree_digest(out) == before

    checkpoint = work / "model" / "checkpoint" / "state.json"
    resumed = _start(arguments)
    _kill_when(resumed, checkpoint.is_file)
    log = resumed.stdout.read()
    assert f"resuming: {done_at_kill} finished trial(s) kept" in log, log
    assert json.loads(checkpoint.read_text())["epochs_done"] < 3 and _tree_digest(out) == before

    # This last run shows what a user sees by default: progress lines, and library noise only in the logs.
    finished = subprocess.run(
        [sys.executable, "-m", "fmnist", "run", *arguments], capture_output=True, text=True, timeout=900
    )
    assert finished.returncode == 0, finished.stdout + finished.stderr
    assert re.search(r"^  Epoch \d+/3$", finished.stderr, re.MULTILINE), finished.stderr
    for noise in ("Input Notebook", "absl::InitializeLog", "cuInit", "Kernel is running over TCP", "Traceback"):
        assert noise not in finished.stderr, noise
    assert "Input Notebook" in (out / "logs" / "03_train.log").read_text()
    assert "02_tune: current" in finished.stderr
    assert "resuming: 1 epoch(s) done in its checkpoint" in finished.stderr or "resuming: 2 epoch(s)" in finished.stderr
    layout = ArtifactLayout(out)
    # Every trial ran to completion exactly once, with the uninterrupted run's results.
    assert len(list(out.glob("tuning/keras_tuner/search_*/trial_*"))) == 3
    results = ["trial", "learning_rate", "batch_size", "dropout_rate", "epochs_run", "val_loss", "val_accuracy"]
    pd.testing.assert_frame_equal(
        pd.read_csv(layout.tuning_trials)[results], pd.read_csv(reference.tuning_trials)[results]
    )
    summary = json.loads(layout.training_summary.read_text())
    assert summary["resumed_at_epoch"] >= 1
    assert summary["validation"] == json.loads(reference.training_summary.read_text())["validation"]
    resumed_model, uninterrupted = training.load_model(layout.model), training.load_model(reference.model)
    for mine, theirs in zip(resumed_model.get_weights(), uninterrupted.get_weights(), strict=True):
        np.testing.assert_array_equal(mine, theirs)
    test = data.load_fashion_mnist()
    accuracy = [
        float((m.predict(test.x_test, verbose=0).argmax(1) == test.y_test).mean())
        for m in (resumed_model, uninterrupted)
    ]
    assert accuracy[0] == accuracy[1]
    assert not work.exists()  # Published: the work directory became out/.


def test_cli_rejects_a_mistyped_key_before_any_compute(tmp_path, capsys):
    profile = tmp_path / "typo"
    shutil.copytree(PARAMS_DIR / "smoke", profile)
    (profile / "02_tune.yaml").write_text("tunning_epochs: 1\n")
    assert main(["run", "--params", str(profile), "--out", str(tmp_path / "out"), "--quiet"]) == 1
    assert "unknown parameter 'tunning_epochs'. Did you mean 'tuning_epochs'?" in capsys.readouterr().err
    assert not (tmp_path / "out" / "notebooks").exists()


def test_the_report_refuses_artifacts_of_different_runs(smoke_run, tmp_path, capsys):
    _, reference = smoke_run
    mixed = tmp_path / "mixed"
    shutil.copytree(reference.root, mixed)
    # As if another run's training had written its summary here.
    summary = json.loads((mixed / "model" / "training.json").read_text())
    summary["epochs_run"] = 99
    (mixed / "model" / "training.json").write_text(json.dumps(summary))
    before = _tree_digest(mixed)
    arguments = ["run", "--params", str(PARAMS_DIR / "smoke"), "--out", str(mixed), "--stage", "report", "--quiet"]
    assert main(arguments) == 1
    error = capsys.readouterr().err
    assert "mixes artifacts of different runs" in error
    assert "model/training.json is not the file 03_train wrote" in error
    assert _tree_digest(mixed) == before


def test_stages_from_another_profile_are_reported_as_mixed(smoke_run, tmp_path):
    from fmnist import runs

    _, reference = smoke_run
    mixed = tmp_path / "mixed"
    shutil.copytree(reference.root, mixed)
    layout = ArtifactLayout(mixed)
    assert runs.consistency_problems(layout) == []
    manifest = json.loads(layout.stage_manifest("01_eda").read_text())
    manifest["run"]["profile"] = "params"
    layout.stage_manifest("01_eda").write_text(json.dumps(manifest))
    problems = runs.consistency_problems(layout)
    assert len(problems) == 1 and problems[0].startswith("stages come from different params profiles (params: 01_eda;")


def test_a_rerun_recomputes_only_the_stages_whose_inputs_or_parameters_changed(smoke_run, tmp_path, monkeypatch):
    _, reference = smoke_run
    out = tmp_path / "out"
    # As a fresh clone has it: the TensorBoard logs are git-ignored, and no stage reruns for them.
    shutil.copytree(reference.root, out, ignore=shutil.ignore_patterns("tensorboard"))
    same = run_chain(PARAMS_DIR / "smoke", out, echo="none")
    assert same.stage_seconds == {} and same.kept == [
        "01_eda",
        "02_tune",
        "03_train",
        "04_evaluate",
        "05_deploy",
        "report",
    ]
    profile = tmp_path / "profile"
    shutil.copytree(PARAMS_DIR / "smoke", profile)
    (profile / "04_evaluate.yaml").write_text("misclassified_examples: 4\nconfused_pairs: 3\n")
    # Another profile directory starts empty; the same directory with one changed file keeps the rest.
    manifest = json.loads((out / "manifest.json").read_text())
    for stage_manifest in (out / "manifests").glob("*.json"):
        content = json.loads(stage_manifest.read_text())
        content["run"]["profile"] = str(profile)
        stage_manifest.write_text(json.dumps(content))
    manifest["params_profile"] = str(profile)
    (out / "manifest.json").write_text(json.dumps(manifest))
    # Someone edits the code while 04 runs: its record must name the code it ran, so the next run reruns it.
    real_digests, real_execute, real_write = runs.code_digests, pipeline.execute_stage, runs.write_record

    def execute_then_edit(stage, *args, **kwargs):
        seconds = real_execute(stage, *args, **kwargs)
        if stage == "04_evaluate":
            # The files now read as edited; sources taken before the stage stay as they were.
            monkeypatch.setattr(
                runs,
                "code_digests",
                lambda modules, sources=None: (
                    real_digests(modules, sources) if sources is not None else dict.fromkeys(modules, "edited")
                ),
            )
        return seconds

    def write_then_restore(*args, **kwargs):
        real_write(*args, **kwargs)
        monkeypatch.setattr(runs, "code_digests", real_digests)

    monkeypatch.setattr(pipeline, "execute_stage", execute_then_edit)
    monkeypatch.setattr(runs, "write_record", write_then_restore)
    changed = run_chain(profile, out, echo="none")
    assert list(changed.stage_seconds) == ["04_evaluate", "report"]
    assert changed.kept == ["01_eda", "02_tune", "03_train", "05_deploy"]
    evaluated = json.loads((out / "manifests" / "04_evaluate.json").read_text())
    assert evaluated["parameters"]["misclassified_examples"] == 4
    assert evaluated["run"]["code"] == real_digests(evaluated["code_modules"])
    assert "fmnist.evaluation" in evaluated["run"]["code"]


# In the page: every heading with what follows it up to the next heading, as a person reads the document.
SECTIONS_SCRIPT = """
() => {
  const nodes = document.querySelectorAll('.jp-Cell h2, .jp-Cell h3, .jp-Cell p, .jp-Cell img, .jp-Cell table,'
    + ' .jp-Cell li, .jp-Cell pre, .jp-Cell blockquote');
  const sections = [];
  for (const node of nodes) {
    if (node.tagName === 'H2' || node.tagName === 'H3') {
      sections.push({heading: node.textContent.replace('¶', '').trim(), content: 0});
    } else if (sections.length && (node.tagName === 'IMG' || node.textContent.trim())) {
      sections[sections.length - 1].content += 1;
    }
  }
  return sections;
}
"""


def test_the_report_reads_offline_with_contents_banner_and_no_empty_section(smoke_run):
    """The smoke run's report in Chromium with the network off: what a reader sees first, and that nothing is empty."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium and os.environ.get("CI") != "true":
        pytest.skip("Debian's chromium is not installed (apt-get install chromium); CI installs it")
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    _, layout = smoke_run
    machine = json.loads(layout.manifest.read_text())["machine"]
    requests, failures = [], []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        context = browser.new_context(offline=True, viewport={"width": 1280, "height": 800})
        page = context.new_page()
        page.on("request", lambda request: requests.append(request.url))
        page.on("requestfailed", lambda request: failures.append(request.url))
        page.goto(layout.report.resolve().as_uri(), wait_until="load")
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOTS / "report-top.png"))

        # Offline and self-contained: the page itself and inline data only, nothing failed.
        assert not failures, failures
        assert all(url.startswith(("file:", "data:")) for url in requests), requests

        # The banner, above the contents: the profile (a smoke run says it is one) and the machine's CPU.
        banner = page.locator("blockquote").first
        assert "Not the reference study" in banner.inner_text() and "params/smoke" in banner.inner_text()
        assert machine["cpu"] in banner.inner_text()
        contents = page.locator("nav#contents")
        assert banner.bounding_box()["y"] < contents.bounding_box()["y"] < page.locator("h2").nth(1).bounding_box()["y"]

        # Every contents entry leads to a visible heading of the same name, and following one scrolls there.
        links = contents.locator("a")
        assert links.count() >= 8
        for index in range(links.count()):
            link = links.nth(index)
            target = page.locator(f"id={link.get_attribute('href')[1:]}")
            assert target.count() == 1 and target.is_visible(), link.get_attribute("href")
            assert target.inner_text().replace("¶", "").strip() == link.inner_text().strip()
        last = links.nth(links.count() - 1)
        last.click()
        heading = page.locator(f"id={last.get_attribute('href')[1:]}")
        assert 0 <= heading.bounding_box()["y"] < 800

        # No empty sections: the smoke run has no ablation or calibration, so those headings are left out.
        sections = page.evaluate(SECTIONS_SCRIPT)
        assert [section["heading"] for section in sections if not section["content"]] == []
        assert not any(section["heading"].startswith(("Ablation", "Calibration")) for section in sections)
        browser.close()
