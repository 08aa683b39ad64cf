"""What every stage notebook does first and last: seed, locate artifacts, write a manifest.

A notebook starts with ``stage = begin_stage("03_train", globals())``: the
stage's parameters are read back from the notebook's own ``parameters`` cell
(one source of truth, also used to validate params files), the seed is set and
the artifact layout resolved. It ends with ``stage.finish()``, which writes the
stage's manifest.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fmnist.config import INTERACTIVE_DIR, NOTEBOOKS_DIR, ArtifactLayout
from fmnist.io import write_json
from fmnist.manifest import environment
from fmnist.runtime import set_seed


def notebook_path(stage: str) -> Path:
    return NOTEBOOKS_DIR / f"{stage}.ipynb"


def declared_parameters(stage: str) -> dict[str, dict[str, Any]]:
    """The names, inferred types and defaults of a stage notebook's ``parameters`` cell."""
    import papermill

    path = notebook_path(stage)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no notebook for stage {stage!r}.")
    return papermill.inspect_notebook(str(path))


@dataclass
class StageRun:
    """One execution of one stage: its parameters, where its files go, and its timing."""

    name: str
    params: dict[str, Any]
    layout: ArtifactLayout
    started: float = field(default_factory=time.perf_counter)
    records: dict[str, Any] = field(default_factory=dict)

    def record(self, **values: Any) -> None:
        """Add facts (data checksums, chosen hyperparameters, ...) to this stage's manifest."""
        self.records.update(values)

    def external_input(self, path: str | Path) -> Path | None:
        """A file outside this run that the stage reads (relative paths from the project root).

        Its digest goes into the stage's manifest (under its name relative to the
        project root when inside it), so the stage reruns when the file changes.
        Returns its path, or None when it does not exist.
        """
        from fmnist.config import PROJECT_ROOT
        from fmnist.runs import file_digest, project_relative

        path = Path(path) if Path(path).is_absolute() else PROJECT_ROOT / path
        digest = file_digest(path) if path.is_file() else None
        # Named as given (a symbolic link as itself), so repointing the link makes the stage rerun.
        self.records.setdefault("external_inputs", {})[project_relative(path, follow_links=False)] = digest
        return path if digest else None

    def save_figure(self, figure, name: str) -> None:
        """Store a figure as ``figures/<name>.png`` for the report; the notebook shows it inline."""
        from fmnist.plots import save_figure

        save_figure(figure, self.layout.figure(name))

    def finish(self) -> None:
        """Write the stage's manifest (parameters, records, wall time, environment)."""
        manifest = {
            "stage": self.name,
            "parameters": self.params,
            "wall_time_seconds": round(time.perf_counter() - self.started, 2),
            **self.records,
            # The fmnist modules this stage ran: a change to any of them makes the stage rerun.
            "code_modules": sorted(name for name in sys.modules if name == "fmnist" or name.startswith("fmnist.")),
            "environment": environment(),
        }
        write_json(self.layout.stage_manifest(self.name), manifest)


def begin_stage(name: str, namespace: dict[str, Any]) -> StageRun:
    """Collect the stage's parameters from ``namespace``, set the seed, resolve the output dir."""
    params = {key: namespace[key] for key in declared_parameters(name) if key in namespace}
    out_dir = params.get("out_dir") or INTERACTIVE_DIR
    layout = ArtifactLayout(out_dir)
    layout.root.mkdir(parents=True, exist_ok=True)
    if "seed" in params:
        set_seed(int(params["seed"]))
    return StageRun(name=name, params=params, layout=layout)
