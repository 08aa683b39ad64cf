"""The project's own files agree with each other: conda environment, pyproject, notebooks."""

from __future__ import annotations

import json
import re
import tomllib

import yaml

from fmnist.config import ALL_STAGES, NOTEBOOKS_DIR, PROJECT_ROOT


def test_environment_yml_installs_this_package_with_the_same_python_and_extras():
    environment = yaml.safe_load((PROJECT_ROOT / "environment.yml").read_text())
    pyproject = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())
    conda = [d for d in environment["dependencies"] if isinstance(d, str)]
    python = next(d for d in conda if d.startswith("python"))
    minimum = re.search(r">=\s*([\d.]+)", pyproject["project"]["requires-python"]).group(1)
    assert python.split("=")[-1].startswith(minimum), (python, minimum)
    assert "pip" in conda
    pip_section = next(d["pip"] for d in environment["dependencies"] if isinstance(d, dict))
    editable = next(line for line in pip_section if line.startswith("-e"))
    extras = set(re.search(r"\[(.*)\]", editable).group(1).split(","))
    assert extras <= set(pyproject["project"]["optional-dependencies"]), extras
    assert {"study", "dev"} <= extras


def test_notebooks_are_committed_clean_with_the_python3_kernel_and_a_parameters_cell():
    for stage in ALL_STAGES:
        notebook = json.loads((NOTEBOOKS_DIR / f"{stage}.ipynb").read_text())
        assert notebook["metadata"]["kernelspec"]["name"] == "python3", stage
        code_cells = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]
        assert all(not cell["outputs"] and cell["execution_count"] is None for cell in code_cells), stage
        tagged = [cell for cell in code_cells if "parameters" in cell["metadata"].get("tags", [])]
        assert len(tagged) == 1, stage


def test_the_manifest_calls_a_checkout_dirty_for_code_changes_not_for_the_runs_own_reports(tmp_path, monkeypatch):
    import subprocess

    from fmnist import manifest

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "metrics.json").write_text("{}")
    (tmp_path / "params.yaml").write_text("epochs: 1\n")
    git("init", "-q")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "start")
    monkeypatch.setattr(manifest, "PROJECT_ROOT", tmp_path)
    (tmp_path / "reports" / "metrics.json").write_text('{"test_accuracy": 0.9}')
    assert manifest.git_state()["dirty"] is False
    (tmp_path / "params.yaml").write_text("epochs: 2\n")
    assert manifest.git_state()["dirty"] is True
