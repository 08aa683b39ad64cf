"""Runs that never mix: work beside the output directory, resume there, publish a consistent set at once.

``fmnist run --out DIR`` works in ``.DIR.run/`` next to ``DIR``. Each stage
that completes gets a record in its manifest (``manifests/<stage>.json``,
key ``run``): the run's id, the params profile, a digest of the stage's
parameters, notebook and code, the digests of the files it read and of every
file it wrote. From those records:

- a stage whose parameters, notebook, code and inputs are unchanged, and whose
  outputs are all still there, is *current* and is not recomputed;
- a set is *consistent* when every present file a stage read or wrote still
  has the digest that stage recorded, and all stages come from one profile.

Only a complete, consistent work directory replaces ``DIR``, by two renames;
a kill at any moment leaves ``DIR`` as it was (a kill between the two renames
is repaired by the next run, which puts the previous ``DIR`` back).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fmnist.config import ALL_STAGES, PROJECT_ROOT, REPORT_NOTEBOOK, ArtifactLayout
from fmnist.io import read_json, write_json

RUN_FILE = "run.json"
RECORD_KEY = "run"
# The layout's names relative to OUT: what the tables below are written in.
_LAYOUT = ArtifactLayout("/")


def _names(*paths: Path) -> tuple[str, ...]:
    return tuple(path.relative_to(_LAYOUT.root).as_posix() for path in paths)


# Working state that is neither an input nor an output: resumable caches, never compared or published as results.
CACHE_PATHS = _names(
    _LAYOUT.tuner_dir, _LAYOUT.training_checkpoint, _LAYOUT.experiments.tuner_dir, _LAYOUT.experiments.checkpoints
)
# Files no stage writes, inside a stage's directory: `fmnist verify-run`'s checks (the report reads them).
UNOWNED_PATHS = _names(_LAYOUT.experiments.verifications)
# What each stage owns outright (every file below is its output), besides its figures and executed notebook.
OWNED_PATHS = {
    "01_eda": _names(_LAYOUT.eda),
    "02_tune": _names(_LAYOUT.tuning),
    "03_train": _names(_LAYOUT.model_dir),
    "04_evaluate": _names(_LAYOUT.metrics),
    "05_deploy": _names(_LAYOUT.deploy),
    "06_experiments": _names(_LAYOUT.experiments.root),
    REPORT_NOTEBOOK: _names(_LAYOUT.report),
}
# The files of earlier stages each stage reads (the data is pinned by checksums in fmnist.data's code).
STAGE_INPUTS = {
    "01_eda": (),
    "02_tune": (),
    "03_train": _names(_LAYOUT.best_hyperparameters),
    "04_evaluate": _names(_LAYOUT.model, _LAYOUT.training_summary),
    "05_deploy": _names(_LAYOUT.model, _LAYOUT.training_summary),
    "06_experiments": _names(_LAYOUT.best_hyperparameters),
}


class InconsistentRun(ValueError):
    """Artifacts of different runs, profiles or lineages are about to be reported or published together."""


def _say(message: str) -> None:
    print(f"[fmnist] {message}", file=sys.stderr, flush=True)


def new_run_id() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


def project_relative(path: Path, *, follow_links: bool = True) -> str:
    """How a file or directory is recorded: relative to the project root when inside it (so a clone elsewhere
    names it the same), else its absolute path. Without ``follow_links`` a symbolic link is named as itself,
    not as its target (only ``..`` and ``.`` are normalised away)."""
    absolute = Path(path).resolve() if follow_links else Path(os.path.abspath(path))
    return absolute.relative_to(PROJECT_ROOT).as_posix() if absolute.is_relative_to(PROJECT_ROOT) else str(absolute)


def profile_name(params_dir: Path) -> str:
    """A params profile's identity however its path was spelled."""
    return project_relative(params_dir)


def work_dir_for(out_dir: Path) -> Path:
    out_dir = Path(out_dir).resolve()
    return out_dir.parent / f".{out_dir.name}.run"


def _previous_dir_for(out_dir: Path) -> Path:
    out_dir = Path(out_dir).resolve()
    return out_dir.parent / f".{out_dir.name}.previous"


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def notebook_digest(path: Path) -> str:
    """A digest of a notebook's cells (type and source), not of its outputs or metadata."""
    cells = json.loads(Path(path).read_text())["cells"]
    text = json.dumps([(cell["cell_type"], "".join(cell["source"])) for cell in cells])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def params_digest(params: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _is_cache(relative: str) -> bool:
    """Whether a file is nobody's output: a cache, or a file written outside the stages."""
    return any(relative == cache or relative.startswith(cache + "/") for cache in CACHE_PATHS + UNOWNED_PATHS)


def _files_below(root: Path, relative: str) -> list[str]:
    path = root / relative
    if path.is_file():
        return [relative]
    if not path.is_dir():
        return []
    found = []
    for item in sorted(path.rglob("*")):
        name = item.relative_to(root).as_posix()
        if item.is_file() and not _is_cache(name) and not item.name.startswith("."):
            found.append(name)
    return found


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Size and modification time of every file below ``root`` (caches excluded)."""
    state = {}
    for item in Path(root).rglob("*"):
        if item.is_file():
            name = item.relative_to(root).as_posix()
            if not _is_cache(name):
                stat = item.stat()
                state[name] = (stat.st_size, stat.st_mtime_ns)
    return state


def stage_outputs(root: Path, stage: str, before: dict[str, tuple[int, int]]) -> list[str]:
    """The files a stage just produced: what it owns, plus the figures it (re)wrote and its notebook."""
    after = snapshot(root)
    owned = [name for relative in OWNED_PATHS.get(stage, ()) for name in _files_below(root, relative)]
    figures = [name for name, state in after.items() if name.startswith("figures/") and before.get(name) != state]
    notebooks = [f"notebooks/{stage}.ipynb"] if (root / f"notebooks/{stage}.ipynb").is_file() else []
    if stage == REPORT_NOTEBOOK:  # The report renders every executed notebook to HTML.
        notebooks += [name for name in after if name.startswith("notebooks/") and name.endswith(".html")]
    return sorted(set(owned) | set(figures) | set(notebooks))


def stage_inputs(root: Path, stage: str) -> list[str]:
    """The files a stage reads; the report reads every other stage's outputs."""
    if stage != REPORT_NOTEBOOK:
        return list(STAGE_INPUTS.get(stage, ()))
    layout = ArtifactLayout(root)
    names = []
    for other in ALL_STAGES:
        record = read_record(layout, other)
        if other != REPORT_NOTEBOOK and record:
            names += list(record["outputs"])
    # And fmnist verify-run's checks of stored experiment runs, which no stage writes.
    names += [path.relative_to(layout.root).as_posix() for path in layout.experiments.all_verifications()]
    return sorted(set(names))


def read_record(layout: ArtifactLayout, stage: str) -> dict[str, Any] | None:
    path = layout.stage_manifest(stage)
    if not path.is_file():
        return None
    return read_json(path).get(RECORD_KEY)


@dataclass
class StageIdentity:
    """What decides a stage's result besides its inputs: its parameters, notebook and code."""

    params: str
    notebook: str
    code: dict[str, str]  # Module name -> digest of the fmnist modules the stage imported.


def _module_name(path: Path) -> str:
    from fmnist.config import PACKAGE_DIR

    parts = path.relative_to(PACKAGE_DIR).with_suffix("").parts
    return ".".join(("fmnist", *(parts[:-1] if parts[-1] == "__init__" else parts)))


def _module_file(module: str) -> Path:
    from fmnist.config import PACKAGE_DIR

    inside = PACKAGE_DIR.joinpath(*module.split(".")[1:])
    return inside / "__init__.py" if inside.is_dir() else inside.with_suffix(".py")


def code_sources() -> dict[str, str]:
    """The source text of every module of the fmnist package, by name (``fmnist``, ``fmnist.training``, ...):
    what a stage starts with, digested once it ends (:func:`code_digests`)."""
    from fmnist.config import PACKAGE_DIR

    return {_module_name(path): path.read_text() for path in sorted(PACKAGE_DIR.rglob("*.py"))}


def code_digests(modules: list[str], sources: dict[str, str] | None = None) -> dict[str, str]:
    """Digests of fmnist modules by name, of ``sources`` (see :func:`code_sources`) or else of the files now
    (a module with neither gets "missing")."""
    from fmnist.training import source_digest

    digests = {}
    for module in modules:
        if sources is not None:
            source = sources.get(module)
        else:
            path = _module_file(module)
            source = path.read_text() if path.is_file() else None
        digests[module] = "missing" if source is None else source_digest([source])
    return digests


def write_record(
    layout: ArtifactLayout,
    stage: str,
    *,
    run_id: str,
    profile: str,
    identity: StageIdentity,
    inputs: list[str],
    outputs: list[str],
    seconds: float,
) -> None:
    """Add the run record to the stage's manifest (written by the notebook's ``stage.finish()``)."""
    path = layout.stage_manifest(stage)
    manifest = read_json(path) if path.is_file() else {"stage": stage}
    root = layout.root
    manifest[RECORD_KEY] = {
        "run_id": run_id,
        "profile": profile,
        "params_digest": identity.params,
        "notebook_digest": identity.notebook,
        "code": identity.code,
        "inputs": {name: file_digest(root / name) if (root / name).is_file() else None for name in inputs},
        "outputs": {name: file_digest(root / name) for name in outputs if (root / name).is_file()},
        # Files outside the run the stage read (fmnist.stage.StageRun.external_input).
        "external": manifest.get("external_inputs", {}),
        "runner_wall_time_seconds": round(seconds, 1),
    }
    write_json(path, manifest)


def release_output(layout: ArtifactLayout, path: Path) -> str | None:
    """Drop ``path`` from the records of the stage that wrote it and of those that read it, when a file put there
    since stands in for it (`fmnist verify-run --restore`: a model retrained to the same figures, not the same
    bytes). The records then no longer vouch for the file, and the run stays consistent. Returns the stage that
    wrote it, if any recorded it."""
    name = Path(path).resolve().relative_to(Path(layout.root).resolve()).as_posix()
    writer = None
    for stage in ALL_STAGES:
        manifest_path = layout.stage_manifest(stage)
        manifest = read_json(manifest_path) if manifest_path.is_file() else {}
        record = manifest.get(RECORD_KEY)
        if not record or not (name in record["outputs"] or name in record["inputs"]):
            continue
        if name in record["outputs"]:
            writer = stage
        record["outputs"].pop(name, None)
        record["inputs"].pop(name, None)
        write_json(manifest_path, manifest)
    return writer


def why_not_current(layout: ArtifactLayout, stage: str, identity_now: StageIdentity) -> str | None:
    """None when the stage's record matches now (nothing to recompute), else the reason it must run."""
    record = read_record(layout, stage)
    if record is None:
        return "not done yet"
    if record["params_digest"] != identity_now.params:
        return "its parameters changed"
    if record["notebook_digest"] != identity_now.notebook:
        return "its notebook changed"
    changed = [name for name, digest in code_digests(list(record["code"])).items() if record["code"][name] != digest]
    if changed:
        return f"code changed ({', '.join(sorted(changed))})"
    if stage == REPORT_NOTEBOOK and set(stage_inputs(layout.root, stage)) != set(record["inputs"]):
        return "the set of stages it reports on changed"
    for name, digest in record.get("external", {}).items():
        # Relative to the project root (StageRun.external_input), or absolute (outside it, or older records).
        path = PROJECT_ROOT / name
        now = file_digest(path) if path.is_file() else None
        if now != digest:
            return f"the external file {name} changed"
    root = layout.root
    for name, digest in record["inputs"].items():
        now = file_digest(root / name) if (root / name).is_file() else None
        if now != digest:
            return f"its input {name} changed"
    for name, digest in record["outputs"].items():
        if not (root / name).is_file():
            return f"its output {name} is missing"
        if file_digest(root / name) != digest:
            return f"its output {name} was changed since"
    return None


def consistency_problems(layout: ArtifactLayout) -> list[str]:
    """Why the artifacts below ``layout.root`` do not form one coherent run (empty when they do)."""
    problems, profiles, untracked = [], {}, []
    root = layout.root
    for stage in ALL_STAGES:
        path = layout.stage_manifest(stage)
        if not path.is_file():
            continue
        record = read_json(path).get(RECORD_KEY)
        if record is None:
            untracked.append(stage)
            continue
        profiles.setdefault(record["profile"], []).append(stage)
        for kind in ("inputs", "outputs"):
            for name, digest in record[kind].items():
                if digest is not None and (root / name).is_file() and file_digest(root / name) != digest:
                    role = "read" if kind == "inputs" else "wrote"
                    problems.append(f"{name} is not the file {stage} {role} (run {record['run_id']})")
    if untracked and profiles:
        # Notebooks run by hand (JupyterLab, nbval) record no run; mixed with a tracked run they are foreign.
        problems.append(f"{', '.join(untracked)} ran outside `fmnist run` (no run record), the other stages inside it")
    if len(profiles) > 1:
        listing = "; ".join(f"{profile}: {', '.join(stages)}" for profile, stages in profiles.items())
        problems.append(f"stages come from different params profiles ({listing})")
    return problems


def check_consistent(layout: ArtifactLayout) -> None:
    """Raise ``InconsistentRun`` naming every mismatch and the fix."""
    problems = consistency_problems(layout)
    if problems:
        raise InconsistentRun(
            f"{layout.root} mixes artifacts of different runs:\n  - "
            + "\n  - ".join(problems)
            + "\nRerun the chain (`fmnist run --params PROFILE --out DIR`): it recomputes exactly the stages "
            "whose inputs changed."
        )


# --- The work directory of a run and its publication. ---


@dataclass
class WorkDir:
    path: Path
    run_id: str
    resumed: bool


def recover(out_dir: Path) -> None:
    """Repair a publication that was killed between its two renames."""
    out_dir, previous = Path(out_dir).resolve(), _previous_dir_for(out_dir)
    if previous.is_dir() and not out_dir.exists():
        previous.rename(out_dir)
        _say(f"restored {out_dir} (a publication was interrupted)")
    elif previous.is_dir():
        shutil.rmtree(previous)


def open_work_dir(out_dir: Path, run_key: dict[str, Any], *, fresh: bool = False) -> WorkDir:
    """Resume the unfinished run of the same key, or start one from a copy of ``out_dir`` (same profile only)."""
    out_dir = Path(out_dir).resolve()
    work = work_dir_for(out_dir)
    run_file = work / RUN_FILE
    _discard_leftovers(work)
    if run_file.is_file() and not fresh:
        stored = read_json(run_file)
        if stored.get("key", {}).get("profile") == run_key["profile"]:
            changed = "" if stored.get("key") == run_key else "; parameters or stages changed since, so the stages "
            changed += "whose records differ rerun" if changed else ""
            _say(f"resuming run {stored['run_id']} (started {stored['started']}) in {work}{changed}")
            write_json(run_file, {**stored, "key": run_key})
            return WorkDir(work, stored["run_id"], resumed=True)
        _say(f"the unfinished run {stored.get('run_id')} in {work} was of another profile; starting fresh")
    elif run_file.is_file():
        _say(f"--fresh: discarding the unfinished run in {work}")
    discard(work)
    published = ArtifactLayout(out_dir).manifest
    same_profile = published.is_file() and read_json(published).get("params_profile") == run_key["profile"]
    if out_dir.is_dir() and same_profile and not fresh:
        shutil.copytree(out_dir, work, symlinks=True)
        _say(f"new run in {work}, starting from the published set in {out_dir}")
    else:
        work.mkdir(parents=True)
        if out_dir.is_dir() and any(out_dir.iterdir()):
            reason = "--fresh" if fresh else "it holds another profile's run, or none"
            _say(f"new run in {work}, starting empty ({reason}); {out_dir} is replaced only when this run completes")
    run_id = new_run_id()
    write_json(run_file, {"run_id": run_id, "key": run_key, "started": datetime.now(UTC).isoformat(timespec="seconds")})
    return WorkDir(work, run_id, resumed=False)


def publish(work: Path, out_dir: Path) -> None:
    """Replace ``out_dir`` by the complete work directory: two renames on one file system."""
    out_dir, previous = Path(out_dir).resolve(), _previous_dir_for(out_dir)
    if previous.exists():
        shutil.rmtree(previous)
    if out_dir.exists():
        out_dir.rename(previous)
    Path(work).rename(out_dir)
    # Only now: until the rename, a kill leaves a complete work directory that the next run resumes.
    (out_dir / RUN_FILE).unlink(missing_ok=True)
    if previous.exists():
        shutil.rmtree(previous)


def discard(work: Path) -> None:
    """Remove a work directory: renamed first, so a kill mid-removal never leaves a half-deleted one to resume."""
    work = Path(work)
    if work.exists():
        trash = work.with_name(work.name + ".trash")
        shutil.rmtree(trash, ignore_errors=True)
        work.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)


def _discard_leftovers(work: Path) -> None:
    shutil.rmtree(Path(work).with_name(Path(work).name + ".trash"), ignore_errors=True)


def check_output_dir(out_dir: Path) -> None:
    """Refuse to replace a directory that fmnist did not write: publication replaces it whole."""
    out_dir = Path(out_dir).resolve()
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / "manifest.json").is_file():
        raise ValueError(
            f"{out_dir} is not empty and holds no fmnist run (no manifest.json); a run replaces its output "
            "directory whole. Give a new or empty directory, or one that `fmnist run` wrote."
        )


@contextlib.contextmanager
def exclusive(out_dir: Path):
    """Hold ``.DIR.lock`` for the whole run: a second run on the same directory stops with a clear message."""
    import fcntl

    out_dir = Path(out_dir).resolve()
    lock_path = out_dir.parent / f".{out_dir.name}.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"another `fmnist run` is using {out_dir}; wait for it, or stop it first.") from None
        yield


def progress_note(layout: ArtifactLayout, stage: str) -> str | None:
    """What a resumed stage will pick up: finished trials, the last epoch, stored experiment runs."""
    if stage == "02_tune":
        trials = list(layout.tuner_dir.glob("search_*/trial_*/trial.json"))
        # keras-tuner rewrites trial.json in place; a half-written one is read as unfinished.
        done = sum('"status": "COMPLETED"' in path.read_text() for path in trials)
        return f"{done} finished trial(s) kept" if trials else None
    if stage == "03_train":
        state = layout.training_checkpoint / "state.json"
        if state.is_file():
            return f"{read_json(state)['epochs_done']} epoch(s) done in its checkpoint"
    if stage == "06_experiments":
        runs = layout.experiments.all_runs()
        return f"{len(runs)} stored run(s) kept where their recipe is unchanged" if runs else None
    return None
