"""Project paths and constants, resolved once from the project root.

Every other module asks this one where things live, so a notebook opened in
JupyterLab (cwd ``notebooks/``), a papermill run (cwd of the caller) and the
tests all agree on the same files.
"""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def _find_project_root() -> Path:
    """Return the checkout that holds ``pyproject.toml`` (or the cwd when installed elsewhere)."""
    override = os.environ.get("FMNIST_PROJECT_ROOT")
    if override:
        return Path(override).resolve()
    for candidate in [PACKAGE_DIR, *PACKAGE_DIR.parents]:
        if (candidate / "pyproject.toml").is_file() and (candidate / "notebooks").is_dir():
            return candidate
    return Path.cwd().resolve()


PROJECT_ROOT = _find_project_root()
NOTEBOOKS_DIR = PROJECT_ROOT / "notebooks"
PARAMS_DIR = PROJECT_ROOT / "params"
REPORTS_DIR = PROJECT_ROOT / "reports"
# Where a notebook run by hand (JupyterLab "Run All", nbval) writes its artifacts.
INTERACTIVE_DIR = PROJECT_ROOT / "build" / "interactive"

# The stages of the study, in the order the chain runs them.
STAGES = ("01_eda", "02_tune", "03_train", "04_evaluate", "05_deploy")
# Stages the default chain starts only when OUT already holds them (then kept current); else run when asked for
# (`fmnist run --stage 06_experiments`): hours of training, not minutes.
OPTIONAL_STAGES = ("06_experiments",)
REPORT_NOTEBOOK = "report"
# Every notebook a run can execute, in chain order.
ALL_STAGES = (*STAGES, *OPTIONAL_STAGES, REPORT_NOTEBOOK)

CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
IMAGE_SIZE = 28
NUM_CLASSES = len(CLASS_NAMES)

# The seed document's claims, shown beside ours in the report.
SEED_CLAIMS = {"test_accuracy": 0.90, "test_loss": 0.30}
# Published Fashion-MNIST test accuracies the report compares against: the benchmark table of
# the dataset's authors (https://github.com/zalandoresearch/fashion-mnist#benchmark).
BENCHMARK_URL = "https://github.com/zalandoresearch/fashion-mnist#benchmark"
PUBLISHED_ANCHORS = (
    {"model": "3 Conv+pooling and 2 FC+dropout (Keras)", "parameters": None, "test_accuracy": 0.926},
    {"model": "CNN with shortcuts and dense-like connectivity", "parameters": None, "test_accuracy": 0.947},
    {"model": "ResNet18 with augmentation", "parameters": None, "test_accuracy": 0.949},
    {"model": "MobileNet with horizontal flips", "parameters": None, "test_accuracy": 0.950},
    {"model": "DenseNet-BC", "parameters": 768_000, "test_accuracy": 0.954},
    {"model": "WRN-28-10 + random erasing", "parameters": None, "test_accuracy": 0.963},
    {"model": "WRN40-4", "parameters": 8_900_000, "test_accuracy": 0.967},
)
# The seed's "best hyperparameters", used when the training stage runs without a tuning result.
SEED_HYPERPARAMETERS = {"learning_rate": 1e-3, "batch_size": 64, "dropout_rate": 0.5}


class ArtifactLayout:
    """The files the stages of one run pass to each other, below one output directory."""

    def __init__(self, out_dir: str | os.PathLike[str]):
        self.root = Path(out_dir).resolve()

    @property
    def figures(self) -> Path:
        return self.root / "figures"

    @property
    def executed_notebooks(self) -> Path:
        return self.root / "notebooks"

    @property
    def eda(self) -> Path:
        """01_eda's directory."""
        return self.root / "eda"

    @property
    def eda_summary(self) -> Path:
        return self.eda / "summary.json"

    @property
    def tuning(self) -> Path:
        """02_tune's directory."""
        return self.root / "tuning"

    @property
    def tuner_dir(self) -> Path:
        return self.tuning / "keras_tuner"

    @property
    def tuning_trials(self) -> Path:
        return self.tuning / "trials.csv"

    @property
    def best_hyperparameters(self) -> Path:
        return self.tuning / "best_hyperparameters.json"

    @property
    def budget_comparison(self) -> Path:
        """02_tune's comparison of its ranking with the seed's full-budget grid."""
        return self.tuning / "budget_comparison.json"

    @property
    def model_dir(self) -> Path:
        """03_train's directory."""
        return self.root / "model"

    @property
    def model(self) -> Path:
        return self.model_dir / "model.keras"

    @property
    def training_checkpoint(self) -> Path:
        """03_train's per-epoch checkpoint (removed once the model is saved)."""
        return self.model_dir / "checkpoint"

    @property
    def history(self) -> Path:
        return self.model_dir / "history.json"

    @property
    def training_summary(self) -> Path:
        return self.model_dir / "training.json"

    @property
    def deploy(self) -> Path:
        """05_deploy's directory."""
        return self.root / "deploy"

    def litert_model(self, kind: str) -> Path:
        """The exported LiteRT model, ``kind`` being "float32" or "int8"."""
        return self.deploy / f"model_{kind}.tflite"

    @property
    def deploy_summary(self) -> Path:
        return self.deploy / "deploy.json"

    @property
    def bench(self) -> Path:
        return self.deploy / "bench.json"

    @property
    def shipping(self) -> Path:
        """05_deploy's choice of the model that ships, with every candidate's figures."""
        return self.deploy / "shipping.json"

    @property
    def shipped_model(self) -> Path:
        """The int8 model that the shipping rule chose (``make ship-model`` installs it)."""
        return self.deploy / "shipped_int8.tflite"

    @property
    def tensorboard_dir(self) -> Path:
        """TensorBoard logs of the trainings, one directory per stage (``tensorboard/03_train/`` ...).

        Published with the run but neither a stage's input nor its output (``fmnist.runs`` tracks
        neither), and git-ignored under ``reports/``: ``make tensorboard`` shows them.
        """
        return self.root / "tensorboard"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.json"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    @property
    def report(self) -> Path:
        return self.root / "report.html"

    @property
    def experiments(self) -> ExperimentsLayout:
        """The 06_experiments stage's files (``experiments/``)."""
        return ExperimentsLayout(self.root / "experiments")

    def stage_manifest(self, stage: str) -> Path:
        return self.root / "manifests" / f"{stage}.json"

    def figure(self, name: str) -> Path:
        return self.figures / f"{name}.png"


class ExperimentsLayout:
    """The 06_experiments stage's files below its directory: ``OUT/experiments``, or another run's, which
    05_deploy may take its candidates from.

    The directory is kept as given, not resolved: a path read from outside a run is recorded as it was named.
    """

    def __init__(self, directory: str | os.PathLike[str]):
        self.root = Path(directory)

    @property
    def runs(self) -> Path:
        """One record per run: ``runs/<recipe>/seed<N>.json``."""
        return self.root / "runs"

    @property
    def models(self) -> Path:
        """Each run's Keras model and each recipe's LiteRT files (not committed)."""
        return self.root / "models"

    @property
    def checkpoints(self) -> Path:
        """Per-epoch checkpoints of runs in progress (a cache: removed once a run is stored)."""
        return self.root / "checkpoints"

    @property
    def tuner_dir(self) -> Path:
        """The hyperparameter search's keras-tuner state (a cache)."""
        return self.root / "keras_tuner"

    @property
    def verifications(self) -> Path:
        """``fmnist verify-run``'s latest check of each stored run: ``verified/<recipe>/seed<N>.json``."""
        return self.root / "verified"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def latency(self) -> Path:
        """Single-image LiteRT latency of every file in ``models/``, keyed by file name."""
        return self.root / "latency.json"

    @property
    def throughput(self) -> Path:
        return self.root / "throughput.json"

    @property
    def search(self) -> Path:
        """The hyperparameter search's request, best values and wall time."""
        return self.root / "search.json"

    @property
    def search_trials(self) -> Path:
        return self.root / "search_trials.csv"

    def run(self, recipe_name: str, seed: int) -> Path:
        return self.runs / recipe_name / f"seed{seed}.json"

    def recipe_runs(self, recipe_name: str) -> list[Path]:
        """The stored runs of one recipe, in seed order as text."""
        return sorted((self.runs / recipe_name).glob("seed*.json"))

    def all_runs(self) -> list[Path]:
        return sorted(self.runs.glob("*/seed*.json"))

    def model(self, recipe_name: str, seed: int) -> Path:
        """A run's trained Keras model (a distilled recipe's teacher is read from here)."""
        return self.models / f"{recipe_name}_seed{seed}.keras"

    @staticmethod
    def litert_name(recipe_name: str, kind: str) -> str:
        """The file name of a recipe's exported LiteRT model, ``kind`` being "float32" or "int8" (the latency
        figures are keyed by it)."""
        return f"{recipe_name}_{kind}.tflite"

    def litert_model(self, recipe_name: str, kind: str) -> Path:
        return self.models / self.litert_name(recipe_name, kind)

    def checkpoint(self, recipe_name: str, seed: int) -> Path:
        return self.checkpoints / recipe_name / f"seed{seed}"

    def verification(self, recipe_name: str, seed: int) -> Path:
        return self.verifications / recipe_name / f"seed{seed}.json"

    def all_verifications(self) -> list[Path]:
        """Every stored check of ``fmnist verify-run`` (see :meth:`verification`)."""
        return sorted(self.verifications.glob("*/seed*.json"))
