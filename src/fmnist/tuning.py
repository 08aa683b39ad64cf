"""Hyperparameter search with keras-tuner over any recipe's fields, on the validation split.

Every trial trains through ``fmnist.training`` (the same network builder,
loss, seeded input pipeline and early stopping as the study and the
experiments). A search is described by a ``SearchRequest``; keras-tuner keeps
its state in a directory named by the request's digest, so rerunning the same
search after a kill keeps every finished trial, while a changed request (other
parameters, other data, other training code) starts fresh and says so.

With ``workers`` > 0 the search runs as keras-tuner's chief (which holds the
oracle and serves it over gRPC) plus that many worker processes
(``fmnist tune-worker``). The request travels inside the search space as a
fixed hyperparameter, so a worker needs only the oracle's address, the data and
the same code: it refuses to start otherwise.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fmnist.recipes import Recipe
from fmnist.runtime import quiet_tensorflow

quiet_tensorflow()

import keras_tuner  # noqa: E402

from fmnist import training  # noqa: E402
from fmnist.io import write_text  # noqa: E402


def _save_json_atomically(path, obj) -> str:
    """keras-tuner's ``save_json``, atomic.

    keras-tuner writes its oracle, tuner and trial files in place, so a kill -9
    during a write left a truncated file that no rerun could reload. Replacing
    the one function every writer calls keeps its state whole at any instant.
    """
    text = json.dumps(obj)
    write_text(path, text)
    return text


keras_tuner.src.utils.save_json = _save_json_atomically

# The seed document's search space.
SEED_SEARCH_SPACE = {
    "learning_rate": [1e-3, 1e-4, 1e-5],
    "batch_size": [32, 64, 128],
    "dropout_rate": [0.1, 0.3, 0.5],
}
TUNERS = ("grid", "random", "hyperband")
# Trials are ranked as early stopping ranks epochs (validation loss), or by validation accuracy.
OBJECTIVES = {"val_loss": "min", "val_accuracy": "max"}
# The recipe fields a search may choose: they change training, not what the network is.
SEARCHABLE_FIELDS = ("learning_rate", "batch_size", "dropout_rate", "label_smoothing", "erasing", "shift_pixels")
# The name of the fixed hyperparameter that carries the request to workers.
REQUEST_KEY = "request"
# The tuner id of a search that runs in one process (keras-tuner's default).
IN_PROCESS_ID = "tuner0"


def _say(message: str) -> None:
    print(f"[tune] {message}", file=sys.stderr, flush=True)


def code_version() -> str:
    """The training path's digest plus the search's own: what a trial's result depends on."""
    search_path = [
        SearchRequest.training_data,
        SearchRequest.recipe_for,
        RecipeHyperModel,
        ResumableGridSearchOracle,
        make_tuner,
    ]
    return training.code_digest([*training.training_path(), *search_path])


@dataclass(frozen=True)
class SearchRequest:
    """Everything that decides a search's trials, and nothing else (not how many processes run it)."""

    recipe: dict[str, Any]  # The base recipe (Recipe.as_dict()); the search space's fields replace its values.
    search_space: dict[str, list]
    tuner: str = "grid"
    objective: str = "val_loss"
    max_trials: int = 0  # 0: the whole grid (grid, random); Hyperband ignores it.
    seed: int = 42
    validation_size: int = 6000
    train_subset: int = 0
    data_checksums: dict[str, str] = dataclasses.field(default_factory=dict)
    code: str = dataclasses.field(default_factory=code_version)

    def __post_init__(self):
        if self.tuner not in TUNERS:
            raise ValueError(f"tuner={self.tuner!r}: choose one of {', '.join(TUNERS)}.")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective={self.objective!r}: choose one of {', '.join(OBJECTIVES)}.")
        unknown = set(self.search_space) - set(SEARCHABLE_FIELDS)
        if unknown or not self.search_space:
            raise ValueError(
                f"search space {sorted(self.search_space)}: give lists of values for some of "
                f"{', '.join(SEARCHABLE_FIELDS)}."
            )
        for name, values in self.search_space.items():
            if not isinstance(values, list) or not values:
                raise ValueError(f"search space: {name}={values!r}; give a non-empty list of values.")
        if self.max_trials < 0:
            raise ValueError(f"max_trials={self.max_trials}: must be 0 (the whole grid) or positive.")
        if self.recipe.get("precision", "auto") == "auto":
            # Resolved once, where the request is made: every trial, in any worker on any machine, computes alike.
            object.__setattr__(self, "recipe", {**self.recipe, "precision": training.resolve_precision("auto")})
        if self.base_recipe().hard_share:  # Also checks the recipe's fields.
            raise ValueError(
                f"recipe {self.recipe['name']!r}: hard-image selection (hard_share={self.recipe['hard_share']}) "
                "plans its own epochs, and a search trains its trials in rounds of given epochs; search over the "
                "recipe with hard_share: 0."
            )

    def base_recipe(self) -> Recipe:
        return Recipe(**{**self.recipe, "stages": tuple(self.recipe.get("stages", (1, 1, 2)))})

    def recipe_for(self, values: dict[str, Any]) -> Recipe:
        """The base recipe with the values a trial chose (cast to the fields' types)."""
        base = self.base_recipe()
        chosen = {name: type(getattr(base, name))(values[name]) for name in self.search_space}
        return dataclasses.replace(base, **chosen)

    @property
    def grid_size(self) -> int:
        return int(np.prod([len(values) for values in self.search_space.values()]))

    @property
    def trial_budget(self) -> int:
        return self.max_trials or self.grid_size

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> SearchRequest:
        return cls(**json.loads(text))

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:12]

    def training_data(self, x_full: np.ndarray, y_full: np.ndarray):
        """The training subset and validation split every trial uses (the test set never enters a search)."""
        from fmnist import data

        x_train, y_train, x_val, y_val = data.train_validation_split(x_full, y_full, self.validation_size, self.seed)
        x_train, y_train = data.stratified_subset(x_train, y_train, self.train_subset, self.seed)
        return x_train, y_train, x_val, y_val


class RecipeHyperModel(keras_tuner.HyperModel):
    """A request's recipe with its search-space fields chosen by keras-tuner; trains through ``training.fit``."""

    def __init__(self, request: SearchRequest, train_images: int, verbose: int = 2):
        super().__init__(name=f"{request.recipe['name']}_search")
        self.request, self.train_images, self.verbose = request, train_images, verbose

    def chosen(self, hp: keras_tuner.HyperParameters) -> Recipe:
        hp.Fixed(REQUEST_KEY, self.request.to_json())
        values = {name: hp.Choice(name, choices) for name, choices in self.request.search_space.items()}
        return self.request.recipe_for(values)

    def build(self, hp: keras_tuner.HyperParameters):
        recipe = self.chosen(hp)
        return training.build(recipe, self.train_images, self.request.seed)

    def fit(self, hp, model, x_train, y_train, validation_data=None, callbacks=(), epochs=None, initial_epoch=0, **_):
        recipe = self.chosen(hp)
        x_val, y_val = validation_data
        fitted = training.fit(
            recipe,
            x_train,
            y_train,
            x_val,
            y_val,
            seed=self.request.seed,
            model=model,
            callbacks=list(callbacks),
            epochs=epochs,
            initial_epoch=initial_epoch,
            verbose=self.verbose,
        )
        # The trial's score is what the kept weights score: the best epoch under early stopping,
        # else the last one.
        return {
            "val_loss": fitted.best("val_loss"),
            "val_accuracy": fitted.best("val_accuracy"),
            "fit_seconds": fitted.train_seconds,
            "epochs_run": float(fitted.epochs_run),
            "best_epoch": float(fitted.best_epoch),
        }


class ResumableGridSearchOracle(keras_tuner.oracles.GridSearchOracle):
    """keras-tuner's grid oracle, resumable.

    keras-tuner 1.4.8 saves the trials but not which grid points come next
    (``_ordered_ids``, ``_populate_next``), so a reloaded grid stopped after
    its retried trials, or repeated points. Rebuild both from the stored trials.
    """

    def reload(self):
        super().reload()
        from keras_tuner.src.tuners.gridsearch import LinkedList

        def compare(first: str, second: str) -> int:
            values = self.trials[first].hyperparameters.values, self.trials[second].hyperparameters.values
            return self._compare(*values)

        ordered = sorted(self.trials, key=functools.cmp_to_key(compare))
        self._ordered_ids = LinkedList()
        for trial_id in ordered:
            self._ordered_ids.insert(trial_id)
        self._populate_next = list(ordered)


def make_tuner(request: SearchRequest, hypermodel: RecipeHyperModel, directory: Path) -> keras_tuner.Tuner:
    """The request's keras-tuner tuner, reloading its state from ``directory`` when there is one."""
    objective = keras_tuner.Objective(request.objective, direction=OBJECTIVES[request.objective])
    common = dict(
        hypermodel=hypermodel,
        directory=str(directory.parent),
        project_name=directory.name,
        overwrite=False,
    )
    if request.tuner == "grid":
        oracle = ResumableGridSearchOracle(objective=objective, max_trials=request.trial_budget, seed=request.seed)
        return keras_tuner.Tuner(oracle=oracle, **common)
    common.update(objective=objective, seed=request.seed)
    if request.tuner == "random":
        return keras_tuner.RandomSearch(max_trials=request.trial_budget, **common)
    epochs = max(request.base_recipe().epochs, 2)
    return keras_tuner.Hyperband(max_epochs=epochs, factor=3, hyperband_iterations=1, **common)


def project_directory(root: Path, request: SearchRequest) -> Path:
    """Where keras-tuner keeps this request's state; state of other requests below ``root`` is removed."""
    root = Path(root)
    project = root / f"search_{request.digest}"
    if root.is_dir():
        for other in root.iterdir():
            if other.is_dir() and other != project and other.name.startswith("search_"):
                _say(f"the tuning state in {other} is for other parameters, data or code; starting fresh")
                shutil.rmtree(other)
    return project


def _drop_orphaned_trials(project: Path) -> list[str]:
    """Remove the trials a kill left half-created; return their ids.

    keras-tuner creates a trial by writing its ``trial.json`` (RUNNING) and then the oracle's state, which is
    where the trial's id joins ``start_order`` (and the ongoing trials, the values tried, ...). Killed between
    the two, the trial is on disk but unknown to the saved state: a reloaded oracle counts it against the
    budget, yet never runs or retries it, so the search ends one point short. Removed, it is created again.
    Only ids above every started one are removed, so a new trial never takes the id of one that ran; a trial
    the state knows (ongoing, or queued for retry) is left to keras-tuner.
    """
    state = project / "oracle.json"
    if not state.is_file():
        return []
    started = {str(trial_id) for trial_id in json.loads(state.read_text()).get("start_order", [])}
    highest = max((int(trial_id) for trial_id in started), default=-1)
    dropped = []
    for path in sorted(project.glob("trial_*")):
        trial_id = path.name.removeprefix("trial_")
        if path.is_dir() and trial_id.isdigit() and trial_id not in started and int(trial_id) > highest:
            shutil.rmtree(path)
            dropped.append(trial_id)
    return dropped


def _adopt_tuner_state(project: Path, tuner_id: str) -> None:
    """Let a search resumed in another mode (in-process or chief) reload the oracle's saved state."""
    wanted = project / f"{tuner_id}.json"
    if wanted.is_file() or not (project / "oracle.json").is_file():
        return
    for other in (IN_PROCESS_ID, "chief"):
        if (project / f"{other}.json").is_file():
            shutil.copyfile(project / f"{other}.json", wanted)
            return


def _completed(tuner_or_oracle) -> list:
    oracle = getattr(tuner_or_oracle, "oracle", tuner_or_oracle)
    return [trial for trial in oracle.trials.values() if trial.status == "COMPLETED"]


class _TrialClock:
    """Time each trial at the oracle, from its creation to its end, and report progress."""

    def __init__(self, oracle, request: SearchRequest, done_before: int):
        self.request, self.done = request, done_before
        self.started: dict[str, float] = {}
        self.spans: dict[str, float] = {}
        self.workers: dict[str, str] = {}
        create, end = oracle.create_trial, oracle.end_trial

        def create_trial(tuner_id):
            trial = create(tuner_id)
            if trial.status == "RUNNING" and trial.trial_id not in self.started:
                self.started[trial.trial_id] = time.perf_counter()
                self.workers[trial.trial_id] = tuner_id
            return trial

        def end_trial(trial):
            end(trial)
            trial_id = trial.trial_id
            if trial_id in self.started:
                self.spans[trial_id] = time.perf_counter() - self.started.pop(trial_id)
            stored = oracle.trials[trial_id]
            if stored.status == "COMPLETED":
                self.done += 1
                values = {name: stored.hyperparameters.values[name] for name in request.search_space}
                score = stored.metrics.get_last_value(request.objective)
                _say(
                    f"trial {trial_id} {_describe(values)}: {request.objective} {score:.4f} "
                    f"({self.spans.get(trial_id, float('nan')):.0f} s, {self.workers.get(trial_id, '?')}); "
                    + (
                        f"{self.done} done"
                        if request.tuner == "hyperband"
                        else f"{self.done} of {request.trial_budget} done"
                    )
                )
            else:
                _say(f"trial {trial_id} ended {stored.status}: {(stored.message or '').strip().splitlines()[-1:]}")

        oracle.create_trial, oracle.end_trial = create_trial, end_trial


def _schedule_grid_eagerly(oracle) -> None:
    """Let a grid hand out its next point while trials are still running.

    keras-tuner's grid oracle derives a new point only from trials that have
    ended, so with several workers most of them wait (measured: two workers
    idle half the time). Queueing each trial as it starts lets the next worker
    take the following point at once. This changes who trains what when,
    never a trial's result, so it is not part of ``code_version``.
    """
    create = oracle.create_trial

    def create_trial(tuner_id):
        trial = create(tuner_id)
        if trial.status == "RUNNING" and trial.trial_id not in oracle._populate_next:
            oracle._populate_next.append(trial.trial_id)
        return trial

    oracle.create_trial = create_trial


def _describe(values: dict[str, Any]) -> str:
    return ", ".join(
        f"{name}={value:g}" if isinstance(value, float) else f"{name}={value}" for name, value in values.items()
    )


@dataclass
class SearchResult:
    trials: Any  # pandas.DataFrame, best first.
    best: dict[str, Any]
    stats: dict[str, Any]


def search(
    request: SearchRequest,
    x_full: np.ndarray,
    y_full: np.ndarray,
    *,
    directory: Path,
    workers: int = 0,
    host: str = "127.0.0.1",
    verbose: int = 2,
    tensorboard_dir: Path | None = None,
) -> SearchResult:
    """Run (or resume) the request's search; return its trial table, best values and throughput.

    ``directory`` holds keras-tuner's state (one sub-directory per request).
    ``workers`` > 0 serves the oracle on ``host`` and starts that many
    ``fmnist tune-worker`` processes, each with its share of the CPU cores.
    With ``tensorboard_dir`` every trial logs its epochs and hyperparameters to
    ``<tensorboard_dir>/<trial>/execution0/`` (local workers too).
    """
    if workers < 0:
        raise ValueError(f"workers={workers}: give 0 (in-process) or a positive number of worker processes.")
    x_train, y_train, x_val, y_val = request.training_data(x_full, y_full)
    project = project_directory(Path(directory), request)
    tuner_id = "chief" if workers else IN_PROCESS_ID
    _adopt_tuner_state(project, tuner_id)
    resumed = (project / "oracle.json").is_file()
    for trial_id in _drop_orphaned_trials(project):
        _say(f"trial {trial_id} was being created when the search stopped: it runs again")
    if tensorboard_dir is not None:
        _prepare_tensorboard_dir(Path(tensorboard_dir), project, resumed)
    hypermodel = RecipeHyperModel(request, len(y_train), verbose=verbose)
    port = _free_port(host) if workers else None
    environment = {"KERASTUNER_TUNER_ID": "chief", "KERASTUNER_ORACLE_IP": host, "KERASTUNER_ORACLE_PORT": str(port)}
    with _environment(environment if workers else {}):
        # keras-tuner print()s "Reloading Tuner from ..." when it resumes; the "[tune] ... resuming" line says it.
        with contextlib.redirect_stdout(io.StringIO()):
            tuner = make_tuner(request, hypermodel, project)
        tuner.oracle.verbose = 0  # One progress line per trial (below) instead of keras-tuner's tables.
        done_before = len(_completed(tuner))
        if resumed:
            _say(f"{done_before} of {request.trial_budget} trials done before, resuming ({project.name})")
        if request.tuner == "grid":
            _schedule_grid_eagerly(tuner.oracle)
        clock = _TrialClock(tuner.oracle, request, done_before)
        started = time.perf_counter()
        if workers:
            _run_chief(tuner, project, host, port, workers, tensorboard_dir)
        else:
            budget = (
                f"brackets of up to {request.base_recipe().epochs} epochs"
                if request.tuner == "hyperband"
                else f"{request.trial_budget} trials"
            )
            _say(
                f"{request.tuner} search over {_describe_space(request.search_space)}: "
                f"{budget} on {len(y_train):,} images, in this process"
            )
            with contextlib.redirect_stdout(sys.stderr):
                tuner.search(x_train, y_train, validation_data=(x_val, y_val), callbacks=_callbacks(tensorboard_dir))
        seconds = time.perf_counter() - started
    completed = _completed(tuner)
    trials = trial_table(completed, request, clock)
    if trials.empty:
        raise RuntimeError(f"Every tuning trial failed; see keras-tuner's files in {project}.")
    ran_now = len(completed) - done_before
    measured = trials["trial_seconds"].dropna()
    stats = {
        "mode": f"chief + {workers} workers" if workers else "in-process",
        "workers": workers,
        "trials": len(completed),
        "trials_run_now": ran_now,
        "trials_resumed": done_before,
        "wall_seconds": round(seconds, 1),
        "trials_per_hour": round(ran_now / seconds * 3600, 2) if ran_now else None,
        # What a trial costs beyond its training: building, the data pipeline, checkpoints, the oracle's RPCs.
        "overhead_seconds_per_trial": round(float((measured - trials.loc[measured.index, "fit_seconds"]).mean()), 2)
        if len(measured)
        else None,
        "directory": str(project),
    }
    return SearchResult(trials=trials, best=best_values(trials, request), stats=stats)


def _callbacks(tensorboard_dir: Path | None) -> list:
    """What every trial's fit gets besides the tuner's own: a TensorBoard log, when asked for.

    keras-tuner copies the callback for each trial and points it at ``<dir>/<trial>/execution0/``,
    adding its HParams callback there (``Tuner._configure_tensorboard_dir``).
    """
    return [] if tensorboard_dir is None else [training.TensorBoard(tensorboard_dir)]


def _prepare_tensorboard_dir(tensorboard_dir: Path, project: Path, resumed: bool) -> None:
    """Keep only the logs of the trials this search keeps.

    A fresh search (no state, or another request's) starts with an empty log directory, since its
    trial ids restart at 0000; a resumed one drops the logs of the trials it will run again (those
    in flight when it stopped), which would otherwise hold a second hyperparameter summary.
    """
    if not resumed:
        shutil.rmtree(tensorboard_dir, ignore_errors=True)
        return
    finished = {
        path.parent.name.removeprefix("trial_")
        for path in project.glob("trial_*/trial.json")
        if '"status": "COMPLETED"' in path.read_text()
    }
    if tensorboard_dir.is_dir():
        for trial in tensorboard_dir.iterdir():
            if trial.is_dir() and trial.name not in finished:
                shutil.rmtree(trial, ignore_errors=True)


def _describe_space(space: dict[str, list]) -> str:
    return " x ".join(f"{name} {values}" for name, values in space.items())


def trial_table(completed: list, request: SearchRequest, clock: _TrialClock | None = None):
    """One row per completed trial, best first (ties: longer training, then trial id)."""
    import pandas as pd

    base_epochs = request.base_recipe().epochs
    rows = []
    for trial in completed:
        values = trial.hyperparameters.values
        metric = trial.metrics.get_last_value
        rows.append(
            {
                "trial": trial.trial_id,
                **{name: values[name] for name in request.search_space},
                "epochs": int(values.get("tuner/epochs", base_epochs)),
                "epochs_run": int(metric("epochs_run")),
                "best_epoch": int(metric("best_epoch")),
                "val_loss": metric("val_loss"),
                "val_accuracy": metric("val_accuracy"),
                "fit_seconds": round(metric("fit_seconds"), 1),
                "trial_seconds": round(clock.spans[trial.trial_id], 1)
                if clock and trial.trial_id in clock.spans
                else np.nan,
                "worker": clock.workers.get(trial.trial_id, "") if clock else "",
            }
        )
    if not rows:
        return pd.DataFrame(rows)
    ascending = OBJECTIVES[request.objective] == "min"
    table = pd.DataFrame(rows).sort_values([request.objective, "epochs", "trial"], ascending=[ascending, False, True])
    return table.reset_index(drop=True)


def best_values(trials, request: SearchRequest) -> dict[str, Any]:
    """The best trial's search-space values, with the recipe fields' Python types."""
    best = trials.iloc[0]
    base = request.base_recipe()
    return {name: type(getattr(base, name))(best[name]) for name in request.search_space}


# --- Distributed search: keras-tuner's chief in this process, workers in others. ---


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    previous = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def threads_per_worker(workers: int) -> int:
    """Each of ``workers`` local processes gets an equal share of the cores, so none oversubscribes them."""
    return max(1, (os.cpu_count() or 1) // max(1, workers))


def worker_environment(threads: int) -> dict[str, str]:
    """TensorFlow's thread pools, sized before TensorFlow starts in the worker."""
    return {
        "TF_NUM_INTRAOP_THREADS": str(threads),
        "TF_NUM_INTEROP_THREADS": "1",
        "OMP_NUM_THREADS": str(threads),
        "PYTHONUNBUFFERED": "1",  # Each trial's epochs reach the worker's log as they happen.
        "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"),
    }


def _die_with_chief() -> None:
    """In a local worker: be killed when the chief's process dies (kill -9 included).

    Otherwise an orphaned worker would go on training a trial nobody collects.
    Set in the worker itself (not between fork and exec, unsafe in a threaded
    chief); if the chief is already gone, exit. Linux only (prctl); elsewhere
    the chief's ``finally`` still terminates its workers on any ordinary exit.
    """
    import ctypes
    import signal

    chief = os.environ.get("FMNIST_CHIEF_PID")
    if not chief:
        return
    with contextlib.suppress(AttributeError, OSError):
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != int(chief):
        os._exit(3)


# A worker that dies mid-trial is restarted with the same id, so the oracle hands it the same trial.
MAX_WORKER_RESTARTS = 3


def _run_chief(tuner, project: Path, host: str, port: int, workers: int, tensorboard_dir: Path | None = None) -> None:
    """Serve the oracle until every trial is done, keeping ``workers`` local worker processes alive.

    The trials run in the workers, so they write the TensorBoard logs: local workers into
    ``tensorboard_dir``; a worker on another machine where its own ``--tensorboard`` says
    (the same directory on a shared disk, or its own).
    """
    threads = threads_per_worker(workers)
    logs = project / "workers"
    logs.mkdir(parents=True, exist_ok=True)
    joining = f" --tensorboard {tensorboard_dir}" if tensorboard_dir is not None else ""
    _say(
        f"chief: oracle on {host}:{port}, {workers} local workers with {threads} thread(s) each "
        f"(logs in {logs}); more machines join with `fmnist tune-worker --oracle HOST:{port}{joining}`"
    )
    failure: list[BaseException] = []

    def serve():
        try:
            with contextlib.redirect_stdout(sys.stderr):
                tuner.search()
        except BaseException as error:  # Reported by the supervisor below.
            failure.append(error)

    server = threading.Thread(target=serve, name="keras-tuner-chief", daemon=True)
    server.start()
    processes: dict[str, subprocess.Popen] = {}
    restarts: dict[str, int] = {}

    def start(worker_id: str) -> None:
        command = [
            sys.executable,
            "-m",
            "fmnist",
            "tune-worker",
            "--oracle",
            f"{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}",
            "--id",
            worker_id,
            "--threads",
            str(threads),
            "--directory",
            str(project.parent),
            *(["--tensorboard", str(tensorboard_dir)] if tensorboard_dir is not None else []),
        ]
        log = (logs / f"{worker_id}.log").open("a")
        env = {**os.environ, **worker_environment(threads)}
        for name in ("KERASTUNER_TUNER_ID", "KERASTUNER_ORACLE_IP", "KERASTUNER_ORACLE_PORT"):
            env.pop(name, None)
        env["FMNIST_CHIEF_PID"] = str(os.getpid())
        try:
            processes[worker_id] = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        finally:
            log.close()

    for index in range(workers):
        start(f"worker{index}")
    try:
        while server.is_alive():
            server.join(timeout=1.0)
            for worker_id, process in list(processes.items()):
                code = process.poll()
                if code is None or code == 0 or not server.is_alive():
                    continue
                restarts[worker_id] = restarts.get(worker_id, 0) + 1
                if restarts[worker_id] > MAX_WORKER_RESTARTS:
                    raise RuntimeError(
                        f"tune worker {worker_id} failed {restarts[worker_id]} times (exit {code}); "
                        f"see {logs / (worker_id + '.log')}. Finished trials are kept: rerun to resume."
                    )
                _say(f"{worker_id} exited with {code}; restarting it (its trial is handed to it again)")
                start(worker_id)
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.terminate()
        for process in processes.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=30)
    if failure:
        raise failure[0]


def run_worker(
    oracle: str,
    worker_id: str,
    directory: Path,
    data_dir: str | None = None,
    verbose: int = 2,
    tensorboard_dir: Path | None = None,
) -> int:
    """A keras-tuner worker: ask the chief at ``oracle`` (HOST:PORT) for trials until the search is done.

    The request arrives with the search space; the worker checks that its code
    and data are the chief's before training anything. With ``tensorboard_dir``
    each trial it trains logs there, in the trial's own sub-directory.
    """
    from fmnist import data

    _die_with_chief()
    host, _, port = oracle.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--oracle {oracle!r}: give HOST:PORT, as the chief prints it.")
    environment = {"KERASTUNER_TUNER_ID": worker_id, "KERASTUNER_ORACLE_IP": host, "KERASTUNER_ORACLE_PORT": port}
    with _environment(environment):
        from keras_tuner.src.distribute.oracle_client import OracleClient

        _say(f"{worker_id}: asking the chief at {oracle} for the search")
        space = OracleClient(None).get_space()
        if REQUEST_KEY not in space.values:
            raise RuntimeError(f"the oracle at {oracle} serves no fmnist search request.")
        request = SearchRequest.from_json(space.values[REQUEST_KEY])
        if request.code != code_version():
            raise RuntimeError(
                f"code version {code_version()} here, {request.code} at the chief: "
                "check out the chief's commit on this machine, then start the worker again."
            )
        dataset = data.load_fashion_mnist(data_dir, include_test=False)
        if request.data_checksums and dataset.checksums != request.data_checksums:
            raise RuntimeError("this machine's Fashion-MNIST files differ from the chief's; run `fmnist data`.")
        x_train, y_train, x_val, y_val = request.training_data(dataset.x_train, dataset.y_train)
        project = Path(directory) / f"search_{request.digest}"
        hypermodel = RecipeHyperModel(request, len(y_train), verbose=verbose)
        tuner = make_tuner(request, hypermodel, project)
        _say(f"{worker_id}: {request.tuner} search, {len(y_train):,} training images; waiting for trials")
        tuner.search(x_train, y_train, validation_data=(x_val, y_val), callbacks=_callbacks(tensorboard_dir))
    _say(f"{worker_id}: the chief has no trials left; done")
    return 0
