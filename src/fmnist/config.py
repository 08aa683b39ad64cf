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
    def eda_summary(self) -> Path:
        return self.root / "eda" / "summary.json"

    @property
    def tuner_dir(self) -> Path:
        return self.root / "tuning" / "keras_tuner"

    @property
    def tuning_trials(self) -> Path:
        return self.root / "tuning" / "trials.csv"

    @property
    def best_hyperparameters(self) -> Path:
        return self.root / "tuning" / "best_hyperparameters.json"

    @property
    def budget_comparison(self) -> Path:
        """02_tune's comparison of its ranking with the seed's full-budget grid."""
        return self.root / "tuning" / "budget_comparison.json"

    @property
    def model(self) -> Path:
        return self.root / "model" / "model.keras"

    @property
    def training_checkpoint(self) -> Path:
        """03_train's per-epoch checkpoint (removed once the model is saved)."""
        return self.root / "model" / "checkpoint"

    @property
    def history(self) -> Path:
        return self.root / "model" / "history.json"

    @property
    def training_summary(self) -> Path:
        return self.root / "model" / "training.json"

    def litert_model(self, kind: str) -> Path:
        """The exported LiteRT model, ``kind`` being "float32" or "int8"."""
        return self.root / "deploy" / f"model_{kind}.tflite"

    @property
    def deploy_summary(self) -> Path:
        return self.root / "deploy" / "deploy.json"

    @property
    def bench(self) -> Path:
        return self.root / "deploy" / "bench.json"

    @property
    def shipping(self) -> Path:
        """05_deploy's choice of the model that ships, with every candidate's figures."""
        return self.root / "deploy" / "shipping.json"

    @property
    def shipped_model(self) -> Path:
        """The int8 model that the shipping rule chose (``make ship-model`` installs it)."""
        return self.root / "deploy" / "shipped_int8.tflite"

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
    def experiments(self) -> Path:
        """The 06_experiments stage's directory: ``runs/<recipe>/seed<N>.json``, ``models/``, summaries."""
        return self.root / "experiments"

    @property
    def experiment_runs(self) -> Path:
        return self.experiments / "runs"

    @property
    def experiment_models(self) -> Path:
        return self.experiments / "models"

    @property
    def experiment_verifications(self) -> Path:
        """``fmnist verify-run``'s latest check of each stored run: ``verified/<recipe>/seed<N>.json``."""
        return self.experiments / "verified"

    @property
    def experiments_summary(self) -> Path:
        return self.experiments / "summary.json"

    def stage_manifest(self, stage: str) -> Path:
        return self.root / "manifests" / f"{stage}.json"

    def figure(self, name: str) -> Path:
        return self.figures / f"{name}.png"
