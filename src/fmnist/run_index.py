"""An index of the published runs: one row per directory that ``fmnist run --out DIR`` published.

A published run is a directory with the runner's ``manifest.json`` (its run
id, params profile, git commit, machine and every stage's wall time) and,
when 04_evaluate ran, ``metrics.json`` (test accuracy and loss). Work
directories of unfinished runs (``.DIR.run/``) are hidden and not listed.
Reading never fails on a missing or malformed field: the field is None here
and "-" in the table. No stage imports this module, so editing it reruns nothing.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fmnist.config import PROJECT_ROOT, REPORTS_DIR, STAGES
from fmnist.runs import project_relative

# Where `fmnist runs` looks by default: the committed runs and the scratch ones.
DEFAULT_ROOTS = (REPORTS_DIR, PROJECT_ROOT / "build")
MANIFEST = "manifest.json"
METRICS = "metrics.json"
# Directories inside a run that never hold another run: not searched, so a big run is listed quickly.
INSIDE_A_RUN = {
    "deploy",
    "eda",
    "experiments",
    "figures",
    "logs",
    "manifests",
    "model",
    "notebooks",
    "tensorboard",
    "tuning",
}
# (key of a row, table heading); the CSV has the same columns under the keys.
COLUMNS = (
    ("directory", "directory"),
    ("run_id", "run id"),
    ("profile", "profile"),
    ("commit", "commit"),
    ("machine", "machine"),
    ("test_accuracy", "test acc."),
    ("test_loss", "test loss"),
    ("study_seconds", "study time"),
)
MISSING = "-"


def find_runs(roots: Iterable[str | os.PathLike[str]] = DEFAULT_ROOTS) -> list[Path]:
    """Every directory at or below ``roots`` that holds a ``manifest.json``, each once.

    Hidden directories (a run's work directory ``.DIR.run/``, ``.DIR.previous/``)
    are skipped, and so are the parts of a run that hold no other run.
    """
    found: dict[Path, None] = {}
    for root in roots:
        root = Path(root).resolve()
        if not root.is_dir():
            continue
        for directory, subdirectories, files in os.walk(root):
            here = Path(directory)
            if MANIFEST in files:
                found.setdefault(here)
            subdirectories[:] = sorted(
                name
                for name in subdirectories
                if not name.startswith(".") and not (MANIFEST in files and name in INSIDE_A_RUN)
            )
    return list(found)


def _read(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; empty when the file is missing, unreadable or not an object."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _machine(record: dict[str, Any]) -> str | None:
    """The CPU model, its cores and the widest vector unit, e.g. "AMD EPYC, 2 cores, AVX-512"."""
    cpu = _text(record.get("cpu"))
    if cpu is None:
        return None
    features = record.get("features") if isinstance(record.get("features"), list) else []
    unit = next(
        (
            name
            for flag, name in (
                ("amx_tile", "AMX"),
                ("avx512_bf16", "AVX-512 BF16"),
                ("avx512f", "AVX-512"),
                ("avx2", "AVX2"),
            )
            if flag in features
        ),
        None,
    )
    cores = record.get("cores")
    parts = [cpu] + ([f"{cores} cores"] if isinstance(cores, int) else []) + ([unit] if unit else [])
    return ", ".join(parts)


def stage_seconds(entry: Any) -> float | None:
    """One stage's wall time as the runner measured it (the notebook's own figure for older records)."""
    entry = _mapping(entry)
    seconds = _number(entry.get("runner_wall_time_seconds"))
    return seconds if seconds is not None else _number(entry.get("wall_time_seconds"))


def study_seconds(stages: dict[str, Any]) -> float | None:
    """The study's stages (01_eda to 05_deploy) added up, kept ones included; 06 and the report are not the study."""
    known = [seconds for stage in STAGES if (seconds := stage_seconds(stages.get(stage))) is not None]
    return round(sum(known), 1) if known else None


def describe_run(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """One row of the index: the run's id, profile, commit, machine, test scores and study time (None: unknown)."""
    directory = Path(directory).resolve()
    manifest = _read(directory / MANIFEST)
    metrics = _read(directory / METRICS)
    git = _mapping(manifest.get("git"))
    shown = project_relative(directory)
    dirty = git.get("dirty")
    return {
        "directory": shown,
        "run_id": _text(manifest.get("run_id")),
        "profile": _text(manifest.get("params_profile")),
        "commit": _text(git.get("commit")),
        "dirty": dirty if isinstance(dirty, bool) else None,
        "machine": _machine(_mapping(manifest.get("machine"))),
        "test_accuracy": _number(metrics.get("test_accuracy")),
        "test_loss": _number(metrics.get("test_loss")),
        "study_seconds": study_seconds(_mapping(manifest.get("stages"))),
        "created": _text(manifest.get("created")),
    }


def index_runs(roots: Iterable[str | os.PathLike[str]] = DEFAULT_ROOTS) -> list[dict[str, Any]]:
    """Every published run below ``roots``, newest first (by creation time, then run id)."""
    rows = [describe_run(directory) for directory in find_runs(roots)]
    return sorted(rows, key=lambda row: (row["created"] or "", row["run_id"] or "", row["directory"]), reverse=True)


def duration(seconds: float) -> str:
    """A wall time as people read it: seconds, minutes or hours."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _cell(row: dict[str, Any], key: str) -> str:
    """A row's field as the table shows it."""
    value = row.get(key)
    if value is None:
        return MISSING
    if key == "commit":
        return value[:7] + ("-dirty" if row.get("dirty") else "")
    if key in ("test_accuracy", "test_loss"):
        return f"{value:.4f}"
    if key == "study_seconds":
        return duration(value)
    return str(value)


def format_table(rows: list[dict[str, Any]]) -> str:
    """The rows as an aligned plain-text table with a heading line."""
    cells = [[heading for _, heading in COLUMNS]] + [[_cell(row, key) for key, _ in COLUMNS] for row in rows]
    widths = [max(len(line[column]) for line in cells) for column in range(len(COLUMNS))]
    numeric = {"test_accuracy", "test_loss", "study_seconds"}
    lines = []
    for line in cells:
        padded = [
            text.rjust(width) if key in numeric else text.ljust(width)
            for text, width, (key, _) in zip(line, widths, COLUMNS, strict=True)
        ]
        lines.append("  ".join(padded).rstrip())
    return "\n".join(lines)


def csv_text(rows: list[dict[str, Any]]) -> str:
    """The same rows as CSV: full commit and precision, ``dirty`` beside the commit, empty cells for unknowns."""
    keys = [key for key, _ in COLUMNS]
    keys.insert(keys.index("commit") + 1, "dirty")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=keys, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: "" if row.get(key) is None else row[key] for key in keys})
    return buffer.getvalue()
