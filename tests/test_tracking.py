"""Tracked runs (issue 12): every training's TensorBoard log, and the index of published runs (`fmnist runs`)."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from fmnist import run_index
from fmnist.cli import main
from fmnist.io import write_json

STUDY = {
    "run_id": "20261130T184637Z-323b50",
    "params_profile": "params",
    "git": {"commit": "ce13a546273b79e0acb107e30d0eb18b46195d54", "dirty": False},
    "machine": {"cpu": "AMD EPYC", "cores": 2, "features": ["avx2", "fma", "avx512f"]},
    "created": "2026-11-30T18:51:46+00:00",
    "stages": {
        "01_eda": {"runner_wall_time_seconds": 13.0, "wall_time_seconds": 6.1},
        "03_train": {"runner_wall_time_seconds": 107.0},
    },
}


def _published(tmp_path):
    """A study run with a grid run inside it (as reports/seed_budget), a broken one, and what is not a run."""
    study = tmp_path / "reports"
    write_json(study / "manifest.json", STUDY)
    write_json(study / "metrics.json", {"test_accuracy": 0.9141, "test_loss": 0.24213965})
    # Older, with only some fields: no metrics, no commit, no machine, stage times from the notebooks only.
    grid = study / "seed_budget"
    write_json(
        grid / "manifest.json",
        {
            "run_id": "20261125T135432Z-f85468",
            "params_profile": "params/seed_budget",
            "created": "2026-11-25T17:36:19+00:00",
            "stages": {"02_tune": {"wall_time_seconds": 4068.0}},
            "machine": "not a mapping",
        },
    )
    (tmp_path / "build" / "broken").mkdir(parents=True)
    (tmp_path / "build" / "broken" / "manifest.json").write_text("{ truncated")
    # Not published runs: an unfinished run's work directory, and a file inside a run's own tree.
    write_json(tmp_path / ".reports.run" / "manifest.json", {**STUDY, "run_id": "unfinished"})
    write_json(study / "tensorboard" / "03_train" / "manifest.json", {**STUDY, "run_id": "inside"})
    return study, grid


def test_the_index_lists_each_published_run_and_shows_unknown_fields_as_dashes(tmp_path):
    study, grid = _published(tmp_path)
    rows = run_index.index_runs([tmp_path])
    assert [row["run_id"] for row in rows] == ["20261130T184637Z-323b50", "20261125T135432Z-f85468", None]
    newest, older, broken = rows
    assert newest == {
        "directory": str(study.resolve()),
        "run_id": "20261130T184637Z-323b50",
        "profile": "params",
        "commit": "ce13a546273b79e0acb107e30d0eb18b46195d54",
        "dirty": False,
        "machine": "AMD EPYC, 2 cores, AVX-512",
        "test_accuracy": 0.9141,
        "test_loss": 0.24213965,
        "study_seconds": 120.0,  # The runner's wall time of each stage, added up.
        "created": "2026-11-30T18:51:46+00:00",
    }
    assert older["study_seconds"] == 4068.0 and older["machine"] is None and older["test_accuracy"] is None
    assert broken["directory"].endswith("build/broken")
    # Whitespace aside (the columns are aligned), each line reads:
    lines = [" ".join(line.split()[1:]) for line in run_index.format_table(rows).splitlines()]
    assert lines == [
        "run id profile commit machine test acc. test loss study time",
        "20261130T184637Z-323b50 params ce13a54 AMD EPYC, 2 cores, AVX-512 0.9141 0.2421 2.0 min",
        "20261125T135432Z-f85468 params/seed_budget - - - - 67.8 min",
        "- - - - - - -",
    ]
    # The same directory under two roots is listed once; a root may be a run itself.
    assert len(run_index.index_runs([tmp_path, study, grid])) == 3
    assert [row["run_id"] for row in run_index.index_runs([grid])] == ["20261125T135432Z-f85468"]


def test_fmnist_runs_prints_the_table_and_writes_the_same_rows_as_csv(tmp_path, capsys):
    study, _ = _published(tmp_path)
    write_json(study / "manifest.json", {**STUDY, "git": {"commit": STUDY["git"]["commit"], "dirty": True}})
    table = tmp_path / "out" / "runs.csv"
    assert main(["runs", "--root", str(tmp_path), "--csv", str(table)]) == 0
    printed = capsys.readouterr()
    assert "ce13a54-dirty" in printed.out and "3 row(s) written to" in printed.err
    with table.open() as handle:
        rows = list(csv.DictReader(handle))
    assert [row["run_id"] for row in rows] == ["20261130T184637Z-323b50", "20261125T135432Z-f85468", ""]
    assert rows[0]["commit"] == STUDY["git"]["commit"] and rows[0]["dirty"] == "True"
    assert rows[0]["test_accuracy"] == "0.9141" and rows[0]["study_seconds"] == "120.0"
    assert rows[1]["test_loss"] == "" and rows[1]["profile"] == "params/seed_budget"
    assert main(["runs", "--root", str(tmp_path / "nowhere")]) == 2
    assert "nowhere: no such directory" in capsys.readouterr().err
    assert main(["runs", "--root", str(tmp_path / "out")]) == 0
    assert "no published run" in capsys.readouterr().err


def _bands(count: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % 10
    images = rng.random((count, 28, 28, 1), dtype=np.float32) * 0.2
    for label in range(10):
        images[labels == label, 2 * label + 4 : 2 * label + 7] += 0.8
    return images, labels


def test_a_training_logs_each_epoch_and_a_resumed_one_continues_its_curves(tmp_path, tensorboard_log):
    import keras

    from fmnist import training
    from fmnist.recipes import Recipe

    images, labels = _bands(400)
    recipe = Recipe.from_params(
        "logged", {"architecture": "bn_cnn", "width": 4, "epochs": 3, "patience": 0, "precision": "float32"}
    )
    logs, checkpoint = tmp_path / "tensorboard", tmp_path / "checkpoint"

    def steps(kind: str) -> list[int]:
        return [step for step, _ in tensorboard_log.scalars(logs / kind, "epoch_loss")]

    class Killed(Exception):
        pass

    class KillAtThirdEpoch(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 2:  # Epochs 1 and 2 are done and checkpointed.
                raise Killed

    interrupted = training.TensorBoard(logs)
    with pytest.raises(Killed):
        training.fit(
            recipe,
            images,
            labels,
            images[:100],
            labels[:100],
            seed=0,
            checkpoint_dir=checkpoint,
            callbacks=[interrupted, KillAtThirdEpoch()],
            verbose=0,
        )
    # On disk already (Keras writes each epoch's scalars in the writer's context, which flushes as it closes):
    # a kill -9 here loses none of them, so the resumed fit below can continue the curves.
    assert steps("train") == [0, 1] and steps("validation") == [0, 1]
    interrupted.on_train_end()  # Only to release the summary writer this process still holds.
    resumed = training.fit(
        recipe,
        images,
        labels,
        images[:100],
        labels[:100],
        seed=0,
        checkpoint_dir=checkpoint,
        callbacks=[training.TensorBoard(logs)],
        verbose=0,
    )
    assert resumed.resumed_at == 2 and steps("train") == [0, 1, 2]
    validation = tensorboard_log.scalars(logs / "validation", "epoch_loss")
    assert [value for _, value in validation] == pytest.approx(resumed.history["val_loss"], rel=1e-5)
    # A training from scratch replaces the curves instead of drawing over them.
    training.fit(
        recipe, images, labels, images[:100], labels[:100], seed=1, callbacks=[training.TensorBoard(logs)], verbose=0
    )
    assert steps("train") == [0, 1, 2] and len(list((logs / "train").iterdir())) == 1
