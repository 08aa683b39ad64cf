"""Run the stage notebooks in order with papermill, then render the report.

Stages pass files, never kernel state: each notebook runs in a fresh kernel,
reads what earlier stages wrote below ``out_dir`` and writes its own outputs
there. A failing stage stops the chain, keeps its executed notebook, and is
reported by name and cell.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fmnist.config import ALL_STAGES, NOTEBOOKS_DIR, REPORT_NOTEBOOK, STAGES, ArtifactLayout
from fmnist.io import read_json, write_json
from fmnist.manifest import environment
from fmnist.params import load_profile
from fmnist.stage import notebook_path

KERNEL_NAME = "python3"


class StageFailed(RuntimeError):
    """A stage notebook raised; the message names the stage, the cell and the kept notebook."""


@dataclass
class ChainResult:
    out_dir: Path
    stage_seconds: dict[str, float] = field(default_factory=dict)
    report: Path | None = None


def _say(message: str) -> None:
    print(f"[fmnist] {message}", file=sys.stderr, flush=True)


def execute_stage(stage: str, parameters: dict[str, Any], layout: ArtifactLayout, *, log_output: bool = True) -> float:
    """Execute one notebook into ``layout.executed_notebooks``; return its wall time in seconds."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    output = layout.executed_notebooks / f"{stage}.ipynb"
    output.parent.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    started = time.perf_counter()
    try:
        papermill.execute_notebook(
            str(notebook_path(stage)),
            str(output),
            parameters={**parameters, "out_dir": str(layout.root)},
            kernel_name=KERNEL_NAME,
            cwd=str(NOTEBOOKS_DIR),
            progress_bar=log_output,
            log_output=log_output,
            request_save_on_cell_execute=True,
        )
    except PapermillExecutionError as error:
        raise StageFailed(
            f"stage {stage} failed in cell {error.exec_count} (index {error.cell_index}): "
            f"{error.ename}: {error.evalue}\n  executed notebook kept for inspection: {output}"
        ) from error
    return time.perf_counter() - started


def write_run_manifest(layout: ArtifactLayout, params_dir: Path, stage_seconds: dict[str, float]) -> Path:
    """Merge the stages' own manifests with the runner's timings into ``manifest.json``."""
    previous = read_json(layout.manifest) if layout.manifest.is_file() else {}
    stages = dict(previous.get("stages", {}))
    for stage in ALL_STAGES:
        path = layout.stage_manifest(stage)
        if path.is_file():
            stage_manifest = read_json(path)
            stage_manifest.pop("environment", None)
            # A stage not rerun now keeps the runner's timing from the run that produced it.
            earlier = stages.get(stage, {})
            if "runner_wall_time_seconds" in earlier and stage not in stage_seconds:
                stage_manifest["runner_wall_time_seconds"] = earlier["runner_wall_time_seconds"]
            stages[stage] = stage_manifest
        if stage in stage_seconds:
            stages.setdefault(stage, {})["runner_wall_time_seconds"] = round(stage_seconds[stage], 1)
    return write_json(
        layout.manifest,
        {"params_profile": str(params_dir), "out_dir": str(layout.root), "stages": stages, **environment()},
    )


def run_chain(
    params_dir: str | Path, out_dir: str | Path, *, stages: tuple[str, ...] | None = None, log_output: bool = True
) -> ChainResult:
    """Validate the profile, run the chosen stages (all by default) and render the report."""
    from fmnist.report import render_report

    if log_output:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    chosen = tuple(stages) if stages else (*STAGES, REPORT_NOTEBOOK)
    unknown = [stage for stage in chosen if stage not in ALL_STAGES]
    if unknown:
        raise ValueError(f"unknown stage {unknown[0]!r}; stages are: {', '.join(ALL_STAGES)}.")
    params_dir = Path(params_dir)
    # Every params file is checked before any stage starts computing.
    profile = load_profile(params_dir)
    layout = ArtifactLayout(out_dir)
    result = ChainResult(out_dir=layout.root)
    for position, stage in enumerate(chosen, start=1):
        _say(f"stage {position}/{len(chosen)}: {stage} (params {params_dir}/{stage}.yaml) ...")
        if stage == REPORT_NOTEBOOK:
            write_run_manifest(layout, params_dir, result.stage_seconds)
        seconds = execute_stage(stage, profile[stage], layout, log_output=log_output)
        result.stage_seconds[stage] = seconds
        _say(f"stage {stage} done in {seconds:.0f} s")
    write_run_manifest(layout, params_dir, result.stage_seconds)
    if REPORT_NOTEBOOK in chosen:
        result.report = render_report(layout)
        _say(f"report: {result.report}")
    return result
