"""Run the stage notebooks in order with papermill, then render the report.

Stages pass files, never kernel state: each notebook runs in a fresh kernel,
reads what earlier stages wrote and writes its own outputs beside them, in the
run's work directory (``fmnist.runs``); the output directory receives the
complete set only. A failing stage stops the chain, keeps its executed
notebook in the work directory, and is reported by name and cell; rerunning the
same command resumes there.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

from fmnist import runs
from fmnist.config import ALL_STAGES, NOTEBOOKS_DIR, OPTIONAL_STAGES, REPORT_NOTEBOOK, STAGES, ArtifactLayout
from fmnist.io import read_json, write_json
from fmnist.manifest import describe_machine, environment
from fmnist.params import load_profile
from fmnist.runtime import NATIVE_OUTPUT_ENV
from fmnist.stage import notebook_path

KERNEL_NAME = "python3"
# How much of the notebooks' output reaches the terminal; all of it always goes to OUT/logs/<stage>.log.
ECHO_MODES = ("progress", "all", "none")
# Lines that say how long work is going: the stages' own progress lines and Keras' epoch lines.
PROGRESS_LINE = re.compile(r"^(\[(tune|train|experiments|bench|loadtest|fmnist)\] |Epoch \d+/\d+$|\d+/\d+ - \d+s - )")


class StageFailed(RuntimeError):
    """A stage notebook raised; the message names the stage, the cell and the kept notebook."""


@dataclass
class ChainResult:
    out_dir: Path
    run_id: str = ""
    stage_seconds: dict[str, float] = field(default_factory=dict)
    kept: list[str] = field(default_factory=list)
    report: Path | None = None


def _say(message: str) -> None:
    print(f"[fmnist] {message}", file=sys.stderr, flush=True)


class StageLog:
    """A stage's output: every line into its log file, and to the terminal what ``echo`` asks for.

    ``progress`` shows the stages' own progress lines and Keras' epoch lines; ``all`` shows everything,
    library noise included (``--verbose``); ``none`` shows nothing. papermill writes the kernel's
    stdout and stderr here, and its own messages (the notebook banners) through the ``papermill`` logger.
    Unless ``all``, file descriptor 2 points at the log too while the stage runs, so what the kernel
    process writes there itself (TensorFlow's C++ logs, absl, Jupyter's warnings) lands in the log.
    """

    def __init__(self, path: Path, echo: str = "progress"):
        if echo not in ECHO_MODES:
            raise ValueError(f"echo={echo!r}: choose one of {', '.join(ECHO_MODES)}.")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.echo = echo
        self.file = path.open("a", encoding="utf-8")  # O_APPEND: the kernel's own writes interleave safely.
        self.terminal = sys.stderr
        self.saved_fd: int | None = None
        self.pending = ""
        self.handler = logging.StreamHandler(self)
        self.handler.setFormatter(logging.Formatter("[papermill] %(message)s"))

    def write(self, text: str) -> int:
        self.file.write(text)
        self.file.flush()
        if self.echo == "all":
            self.terminal.write(text)
        elif self.echo == "progress":
            lines = (self.pending + text.replace("\r", "\n")).split("\n")
            self.pending = lines.pop()
            shown = [line for line in lines if PROGRESS_LINE.match(line)]
            if shown:
                self.terminal.write("".join(f"  {line}\n" for line in shown))
                self.terminal.flush()
        return len(text)

    def flush(self) -> None:
        self.file.flush()
        self.terminal.flush()

    def __enter__(self) -> StageLog:
        logger = logging.getLogger("papermill")
        logger.addHandler(self.handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
        if self.echo != "all":
            sys.stderr.flush()
            self.saved_fd = os.dup(2)
            self.terminal = os.fdopen(os.dup(self.saved_fd), "w", encoding="utf-8", errors="replace")
            os.dup2(self.file.fileno(), 2)
        return self

    def __exit__(self, *exc_info) -> None:
        logging.getLogger("papermill").removeHandler(self.handler)
        if self.saved_fd is not None:
            sys.stderr.flush()
            os.dup2(self.saved_fd, 2)
            os.close(self.saved_fd)
            self.terminal.close()
            self.terminal = sys.stderr
        self.file.close()


def execute_stage(stage: str, parameters: dict[str, Any], layout: ArtifactLayout, *, echo: str = "progress") -> float:
    """Execute one notebook into ``layout.executed_notebooks``; return its wall time in seconds.

    papermill saves the notebook after every cell into a hidden file, which
    replaces ``notebooks/<stage>.ipynb`` once the stage ends (failed stages too,
    for inspection). The notebook's output goes to ``logs/<stage>.log`` (see ``StageLog``).
    """
    import papermill
    from papermill.exceptions import PapermillExecutionError

    output = layout.executed_notebooks / f"{stage}.ipynb"
    partial = output.with_name(f".{stage}.running.ipynb")
    output.parent.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # The kernel does not forward what native libraries write to its file descriptor 2 (TensorFlow's C++ logs,
    # LiteRT's notices) into the notebook: it inherits ours, which is the stage's log (the terminal with --verbose).
    started = time.perf_counter()
    native_output = mock.patch.dict(os.environ, {NATIVE_OUTPUT_ENV: "show"})  # Restored when the stage ends.
    with StageLog(layout.root / "logs" / f"{stage}.log", echo) as log, native_output:
        try:
            papermill.execute_notebook(
                str(notebook_path(stage)),
                str(partial),
                parameters={**parameters, "out_dir": str(layout.root)},
                kernel_name=KERNEL_NAME,
                cwd=str(NOTEBOOKS_DIR),
                progress_bar=echo == "all",
                log_output=False,
                stdout_file=log,
                stderr_file=log,
                request_save_on_cell_execute=True,
                extra_arguments=["--IPKernelApp.capture_fd_output=False"],
            )
        except PapermillExecutionError as error:
            os.replace(partial, output)
            raise StageFailed(
                f"stage {stage} failed in cell {error.exec_count} (index {error.cell_index}): "
                f"{error.ename}: {error.evalue}\n  executed notebook kept for inspection: {output}\n"
                f"  its whole output: {log.path}"
            ) from error
    os.replace(partial, output)
    return time.perf_counter() - started


def write_run_manifest(layout: ArtifactLayout, out_dir: Path, params_dir: Path, run_id: str) -> Path:
    """Merge the stages' own manifests (with their run records) into ``manifest.json``."""
    stages = {}
    for stage in ALL_STAGES:
        path = layout.stage_manifest(stage)
        if path.is_file():
            stage_manifest = read_json(path)
            stage_manifest.pop("environment", None)
            record = stage_manifest.get(runs.RECORD_KEY) or {}
            stage_manifest["runner_wall_time_seconds"] = record.get("runner_wall_time_seconds")
            stages[stage] = stage_manifest
    return write_json(
        layout.manifest,
        {
            "run_id": run_id,
            "params_profile": runs.profile_name(params_dir),
            "out_dir": str(out_dir),
            "stages": stages,
            **environment(),
        },
    )


def _chain(requested: tuple[str, ...] | None, out_dir: Path) -> tuple[str, ...]:
    """The requested stages, or the default chain plus the optional stages already in the published set."""
    if requested:
        unknown = [stage for stage in requested if stage not in ALL_STAGES]
        if unknown:
            raise ValueError(f"unknown stage {unknown[0]!r}; stages are: {', '.join(ALL_STAGES)}.")
        return tuple(stage for stage in ALL_STAGES if stage in requested)
    published = ArtifactLayout(out_dir)
    kept = [stage for stage in OPTIONAL_STAGES if published.stage_manifest(stage).is_file()]
    if kept:
        _say(f"{out_dir} includes {', '.join(kept)}: kept in the chain (rerun only if its inputs changed)")
    return (*STAGES, *kept, REPORT_NOTEBOOK)


def run_chain(
    params_dir: str | Path,
    out_dir: str | Path,
    *,
    stages: tuple[str, ...] | None = None,
    echo: str = "progress",
    fresh: bool = False,
) -> ChainResult:
    """Validate the profile, run the chosen stages in a work directory, publish the complete set into ``out_dir``.

    Stages whose parameters, notebook, code and inputs are unchanged are kept;
    an interrupted run of the same command resumes; ``fresh`` recomputes all.
    """
    from fmnist.report import render_report

    if echo not in ECHO_MODES:
        raise ValueError(f"echo={echo!r}: choose one of {', '.join(ECHO_MODES)}.")
    # The notebooks are read for their parameters cells; nbformat's advice about cell ids is not the user's.
    warnings.filterwarnings("ignore", message="Cell is missing an id field")
    params_dir = Path(params_dir)
    # Every params file is checked before any stage starts computing.
    profile = load_profile(params_dir)
    out_dir = Path(out_dir).resolve()
    with runs.exclusive(out_dir):
        runs.recover(out_dir)
        runs.check_output_dir(out_dir)
        return _run_locked(params_dir, profile, out_dir, stages, echo, fresh, render_report)


def _run_locked(params_dir, profile, out_dir, stages, echo, fresh, render_report) -> ChainResult:
    chosen = _chain(tuple(stages) if stages else None, out_dir)
    _say(f"machine: {describe_machine()}")
    profile_id = runs.profile_name(params_dir)
    key = {
        "profile": profile_id,
        "params": runs.params_digest({s: profile[s] for s in chosen}),
        "stages": list(chosen),
    }
    work = runs.open_work_dir(out_dir, key, fresh=fresh)
    layout = ArtifactLayout(work.path)
    result = ChainResult(out_dir=out_dir, run_id=work.run_id)
    with StageLog(layout.root / "logs" / "runner.log", "none"):
        # The runner digests the training code, which imports TensorFlow: its start-up noise goes to the log.
        import fmnist.training  # noqa: F401
    for position, stage in enumerate(chosen, start=1):
        identity = runs.StageIdentity(
            params=runs.params_digest(profile[stage]), notebook=runs.notebook_digest(notebook_path(stage)), code={}
        )
        reason = runs.why_not_current(layout, stage, identity)
        header = f"stage {position}/{len(chosen)}: {stage}"
        if reason is None:
            record = runs.read_record(layout, stage)
            _say(f"{header}: current (same parameters, code and inputs; run {record['run_id']}), kept")
            result.kept.append(stage)
            continue
        note = runs.progress_note(layout, stage)
        _say(f"{header} (params {params_dir}/{stage}.yaml): runs, {reason}" + (f"; resuming: {note}" if note else ""))
        previous = runs.read_record(layout, stage)
        for name in (previous or {}).get("outputs", {}):
            # Nothing of the previous result may pass as this run's, except the experiments' stored runs
            # (and their models and search), which 06_experiments reuses run by run.
            if not name.startswith(tuple(f"{kept}/" for kept in runs.OWNED_PATHS["06_experiments"])):
                (layout.root / name).unlink(missing_ok=True)
        layout.stage_manifest(stage).unlink(missing_ok=True)
        before = runs.snapshot(layout.root)
        # The code as the stage starts: an edit while it runs must not pass as what it ran.
        code_at_start = runs.code_sources()
        if stage == REPORT_NOTEBOOK:
            runs.check_consistent(layout)
            write_run_manifest(layout, out_dir, params_dir, work.run_id)
        seconds = execute_stage(stage, profile[stage], layout, echo=echo)
        if stage == REPORT_NOTEBOOK:
            render_report(layout)
        stage_manifest = read_json(layout.stage_manifest(stage))
        modules = stage_manifest.get("code_modules", [])
        identity.code = runs.code_digests(modules, sources=code_at_start)
        runs.write_record(
            layout,
            stage,
            run_id=work.run_id,
            profile=profile_id,
            identity=identity,
            inputs=runs.stage_inputs(layout.root, stage),
            outputs=runs.stage_outputs(layout.root, stage, before),
            seconds=seconds,
        )
        result.stage_seconds[stage] = seconds
        _say(f"stage {stage} done in {seconds:.0f} s")
    if not result.stage_seconds and not work.resumed and (out_dir / "manifest.json").is_file():
        runs.discard(work.path)
        result.run_id = read_json(out_dir / "manifest.json").get("run_id", "")
        _say(f"every stage is current: {out_dir} is unchanged (run {result.run_id}); --fresh recomputes all")
        result.report = ArtifactLayout(out_dir).report if REPORT_NOTEBOOK in chosen else None
        return result
    write_run_manifest(layout, out_dir, params_dir, work.run_id)
    runs.check_consistent(layout)
    runs.publish(work.path, out_dir)
    if REPORT_NOTEBOOK in chosen:
        result.report = ArtifactLayout(out_dir).report
    _say(f"run {work.run_id} published in {out_dir}")
    return result
