"""The run directory: resume or start afresh, stage records, consistency, publication that survives a kill."""

from __future__ import annotations

import json
import shutil

import pytest

from fmnist import runs
from fmnist.config import PARAMS_DIR, ArtifactLayout
from fmnist.io import write_json


def _published(out, profile="params/x", files=None):
    out.mkdir(parents=True)
    for name, text in (files or {"metrics.json": "{}"}).items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    write_json(out / "manifest.json", {"params_profile": profile, "run_id": "old"})
    return out


def test_profiles_are_named_relative_to_the_project(tmp_path):
    assert runs.profile_name(PARAMS_DIR) == "params"
    assert runs.profile_name(PARAMS_DIR / "smoke" / ".." / "smoke") == "params/smoke"
    assert runs.profile_name(tmp_path) == str(tmp_path.resolve())


def test_the_same_command_resumes_and_other_parameters_start_afresh(tmp_path, capsys):
    out = _published(tmp_path / "out")
    key = {"profile": "params/x", "params": "a", "stages": ["01_eda"]}
    first = runs.open_work_dir(out, key)
    assert not first.resumed and (first.path / "metrics.json").is_file()  # A copy of the published set.
    (first.path / "partial.txt").write_text("work in progress")
    again = runs.open_work_dir(out, key)
    assert again.resumed and again.run_id == first.run_id and (again.path / "partial.txt").is_file()
    # Other parameters of the same profile: the work is kept; each stage's record decides what reruns
    # (finished trials and checkpoints survive a change of `workers`, say).
    changed = runs.open_work_dir(out, {**key, "params": "b"})
    assert changed.resumed and changed.run_id == first.run_id and (changed.path / "partial.txt").is_file()
    assert "parameters or stages changed since" in capsys.readouterr().err
    foreign = runs.open_work_dir(out, {**key, "profile": "params/y"})
    assert "was of another profile; starting fresh" in capsys.readouterr().err
    assert not (foreign.path / "metrics.json").exists()  # Another profile's results are never mixed in.
    fresh = runs.open_work_dir(out, {**key, "profile": "params/y"}, fresh=True)
    assert fresh.run_id != foreign.run_id


def test_publication_replaces_the_directory_whole_and_a_kill_between_renames_is_repaired(tmp_path):
    out = _published(tmp_path / "out", files={"metrics.json": "old"})
    work = runs.open_work_dir(out, {"profile": "params/x", "params": "a", "stages": []})
    (work.path / "metrics.json").write_text("new")
    runs.publish(work.path, out)
    assert (out / "metrics.json").read_text() == "new" and not work.path.exists()
    assert not (out / runs.RUN_FILE).exists()
    # A kill after the first rename: out/ is missing, the previous set waits beside it.
    out.rename(tmp_path / ".out.previous")
    runs.recover(out)
    assert (out / "metrics.json").read_text() == "new" and not (tmp_path / ".out.previous").exists()


def _record(layout, stage, inputs, outputs, profile="params/x"):
    write_json(layout.stage_manifest(stage), {"stage": stage, "code_modules": []})
    runs.write_record(
        layout,
        stage,
        run_id="r1",
        profile=profile,
        identity=runs.StageIdentity(params="p", notebook="n", code={}),
        inputs=inputs,
        outputs=outputs,
        seconds=1.0,
    )


def test_a_stage_is_current_until_its_parameters_inputs_or_outputs_change(tmp_path):
    layout = ArtifactLayout(tmp_path)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model.keras").write_text("weights")
    (tmp_path / "metrics.json").write_text("{}")
    _record(layout, "04_evaluate", ["model/model.keras"], ["metrics.json"])
    identity = runs.StageIdentity(params="p", notebook="n", code={})
    assert runs.why_not_current(layout, "04_evaluate", identity) is None
    assert runs.why_not_current(layout, "04_evaluate", runs.StageIdentity("q", "n", {})) == "its parameters changed"
    assert runs.why_not_current(layout, "03_train", identity) == "not done yet"
    (tmp_path / "model" / "model.keras").write_text("other weights")
    assert runs.why_not_current(layout, "04_evaluate", identity) == "its input model/model.keras changed"
    assert "model/model.keras is not the file 04_evaluate read" in runs.consistency_problems(layout)[0]
    (tmp_path / "metrics.json").unlink()
    (tmp_path / "model" / "model.keras").write_text("weights")
    assert runs.why_not_current(layout, "04_evaluate", identity) == "its output metrics.json is missing"
    assert runs.consistency_problems(layout) == []  # Missing (uncommitted) files are not a mix.


def test_an_external_input_in_the_project_is_recorded_relative_to_it_so_a_clone_elsewhere_finds_it(
    tmp_path, monkeypatch
):
    from fmnist import config
    from fmnist.stage import StageRun

    project, clone = tmp_path / "project", tmp_path / "clone"
    (project / "src").mkdir(parents=True)
    (project / "src" / "model.tflite").write_bytes(b"int8 weights")
    monkeypatch.setattr(config, "PROJECT_ROOT", project)
    monkeypatch.setattr(runs, "PROJECT_ROOT", project)
    layout = ArtifactLayout(tmp_path / "out")
    stage = StageRun("report", {}, layout)
    assert stage.external_input("src/model.tflite") == project / "src" / "model.tflite"
    assert stage.external_input(str(tmp_path / "elsewhere.json")) is None  # Outside the project: absolute.
    assert stage.records["external_inputs"] == {
        "src/model.tflite": runs.file_digest(project / "src" / "model.tflite"),
        str(tmp_path / "elsewhere.json"): None,
    }
    write_json(layout.stage_manifest("report"), {"stage": "report", "code_modules": [], **stage.records})
    runs.write_record(
        layout,
        "report",
        run_id="r1",
        profile="params",
        identity=runs.StageIdentity(params="p", notebook="n", code={}),
        inputs=runs.stage_inputs(layout.root, "report"),
        outputs=[],
        seconds=1.0,
    )
    identity = runs.StageIdentity(params="p", notebook="n", code={})
    assert runs.why_not_current(layout, "report", identity) is None
    # The same project cloned at another path: the same file, so nothing to rerun.
    shutil.copytree(project, clone)
    monkeypatch.setattr(runs, "PROJECT_ROOT", clone)
    assert runs.why_not_current(layout, "report", identity) is None
    (clone / "src" / "model.tflite").write_bytes(b"another model")  # make ship-model
    assert runs.why_not_current(layout, "report", identity) == "the external file src/model.tflite changed"


def test_an_external_input_reached_through_a_link_is_recorded_as_the_link(tmp_path, monkeypatch):
    from fmnist.stage import StageRun

    project = tmp_path / "project"
    (project / "runs").mkdir(parents=True)
    (project / "runs" / "a.json").write_text("a")
    (project / "current.json").symlink_to(project / "runs" / "a.json")
    from fmnist import config

    monkeypatch.setattr(config, "PROJECT_ROOT", project)
    monkeypatch.setattr(runs, "PROJECT_ROOT", project)
    stage = StageRun("report", {}, ArtifactLayout(tmp_path / "out"))
    stage.external_input("current.json")
    # Named as the link, so that pointing it at another file changes what the record checks.
    assert stage.records["external_inputs"] == {"current.json": runs.file_digest(project / "runs" / "a.json")}


def test_the_report_reruns_when_fmnist_verify_run_checks_a_stored_run(tmp_path):
    layout = ArtifactLayout(tmp_path)
    (tmp_path / "metrics.json").write_text("{}")
    _record(layout, "04_evaluate", [], ["metrics.json"])
    _record(layout, "report", runs.stage_inputs(tmp_path, "report"), ["report.html"])
    (tmp_path / "report.html").write_text("<html>")
    identity = runs.StageIdentity(params="p", notebook="n", code={})
    assert runs.why_not_current(layout, "report", identity) is None
    check = layout.experiments.verification("bn_cnn_deep", 42)
    check.parent.mkdir(parents=True)
    check.write_text(json.dumps({"identical": True}))
    assert runs.stage_inputs(tmp_path, "report") == ["experiments/verified/bn_cnn_deep/seed42.json", "metrics.json"]
    assert runs.why_not_current(layout, "report", identity) is not None
    # The checks sit in 06_experiments' directory but are never its outputs: a later check does not make it stale.
    (tmp_path / "experiments" / "runs").mkdir()
    (tmp_path / "experiments" / "runs" / "seed42.json").write_text("{}")
    assert runs.stage_outputs(tmp_path, "06_experiments", {}) == ["experiments/runs/seed42.json"]


def test_a_restored_model_is_released_from_the_record_of_the_stage_that_wrote_another(tmp_path):
    layout = ArtifactLayout(tmp_path)
    model = tmp_path / "experiments" / "models" / "wide_seed42.keras"
    model.parent.mkdir(parents=True)
    model.write_text("weights, saved on Monday")
    (tmp_path / "experiments" / "summary.json").write_text("{}")
    _record(layout, "06_experiments", [], ["experiments/models/wide_seed42.keras", "experiments/summary.json"])
    _record(layout, "report", runs.stage_inputs(tmp_path, "report"), [])
    model.write_text("the same weights, saved on Tuesday")
    problems = runs.consistency_problems(layout)
    assert "wide_seed42.keras is not the file 06_experiments wrote" in problems[0]
    assert "wide_seed42.keras is not the file report read" in problems[1]
    assert runs.release_output(layout, model) == "06_experiments"
    assert runs.consistency_problems(layout) == []
    identity = runs.StageIdentity(params="p", notebook="n", code={})
    assert runs.why_not_current(layout, "06_experiments", identity) is None
    assert list(runs.read_record(layout, "06_experiments")["outputs"]) == ["experiments/summary.json"]
    # The report no longer counts the file among what it read, and nothing it shows came from its bytes.
    assert runs.why_not_current(layout, "report", identity) is None
    assert "experiments/models/wide_seed42.keras" not in runs.read_record(layout, "report")["inputs"]
    assert runs.release_output(layout, model) is None  # Already released: nothing records it.


def test_untracked_stages_mixed_with_a_tracked_run_are_refused(tmp_path):
    layout = ArtifactLayout(tmp_path)
    (tmp_path / "metrics.json").write_text("{}")
    write_json(layout.stage_manifest("01_eda"), {"stage": "01_eda"})  # Run by hand: no record.
    assert runs.consistency_problems(layout) == []  # A notebook session alone is not a mix.
    _record(layout, "04_evaluate", [], ["metrics.json"])
    with pytest.raises(runs.InconsistentRun, match="01_eda ran outside `fmnist run`") as error:
        runs.check_consistent(layout)
    assert "Rerun the chain" in str(error.value)


def test_outputs_are_what_a_stage_owns_plus_the_figures_it_wrote(tmp_path):
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "other_stage.png").write_text("x")
    before = runs.snapshot(tmp_path)
    (tmp_path / "eda").mkdir()
    (tmp_path / "eda" / "summary.json").write_text(json.dumps({"n": 1}))
    (tmp_path / "figures" / "class_balance.png").write_text("y")
    (tmp_path / "tuning" / "keras_tuner").mkdir(parents=True)
    (tmp_path / "tuning" / "keras_tuner" / "oracle.json").write_text("{}")  # A cache, never an output.
    assert runs.stage_outputs(tmp_path, "01_eda", before) == ["eda/summary.json", "figures/class_balance.png"]


def test_a_directory_fmnist_did_not_write_is_never_replaced(tmp_path):
    precious = tmp_path / "data"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    with pytest.raises(ValueError, match="holds no fmnist run"):
        runs.check_output_dir(precious)
    runs.check_output_dir(tmp_path / "new")  # A new or empty directory is fine, as is one fmnist wrote.
    runs.check_output_dir(_published(tmp_path / "published"))


def test_two_runs_on_one_directory_are_refused(tmp_path):
    first, second = runs.exclusive(tmp_path / "out"), runs.exclusive(tmp_path / "out")
    with first, pytest.raises(ValueError, match="another `fmnist run` is using"), second:
        pass
    with runs.exclusive(tmp_path / "out"):  # Released with the first run.
        pass
