"""keras-tuner searches: one training path, resumable state, and the chief + workers mode on loopback."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from fmnist import data, tuning
from fmnist.recipes import Recipe

# One thread and two sum in different orders: validation accuracies may differ by this much (5 of 1,000 images).
SUMMATION_ORDER_IMAGES = 0.005
# The deterministic part of a trial table (timings and the worker's name vary).
RESULTS = [
    "trial",
    "learning_rate",
    "batch_size",
    "dropout_rate",
    "epochs_run",
    "best_epoch",
    "val_loss",
    "val_accuracy",
]


def _children() -> list[tuple[int, str]]:
    """(pid, command line) of this process's children, from /proc (no procps needed)."""
    import os
    from pathlib import Path

    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except (OSError, IndexError, ValueError):
                continue
            if parent == os.getpid():
                found.append((int(entry.name), command))
    return found


@pytest.fixture(scope="module")
def dataset():
    return data.load_fashion_mnist(include_test=False)


def _request(dataset, **changes) -> tuning.SearchRequest:
    settings = dict(
        recipe=Recipe("grid", epochs=1, patience=0).as_dict(),
        search_space={"learning_rate": [1e-3, 1e-4], "batch_size": [64], "dropout_rate": [0.1, 0.5]},
        seed=7,
        validation_size=1000,
        train_subset=600,
        data_checksums=dataset.checksums,
    )
    return tuning.SearchRequest(**{**settings, **changes})


@pytest.mark.slow
def test_two_workers_on_loopback_run_the_same_trials_and_choose_the_same(dataset, tmp_path):
    request = _request(dataset)
    local = tuning.search(request, dataset.x_train, dataset.y_train, directory=tmp_path / "local", verbose=0)
    spread = tuning.search(
        request, dataset.x_train, dataset.y_train, directory=tmp_path / "spread", workers=2, verbose=0
    )
    assert len(local.trials) == len(spread.trials) == 4
    # Same points in the same order, the same choice; the values agree to summation order (1 thread against 2),
    # which on an AVX-512 CPU moves a few of the 1,000 validation images across a boundary after one epoch.
    points = ["learning_rate", "batch_size", "dropout_rate"]
    assert spread.trials[points].values.tolist() == local.trials[points].values.tolist()
    ordered = [frame[RESULTS].sort_values("trial").reset_index(drop=True) for frame in (local.trials, spread.trials)]
    pd.testing.assert_frame_equal(*ordered, rtol=1e-3, atol=SUMMATION_ORDER_IMAGES)
    assert spread.best == local.best
    assert set(spread.trials["worker"]) == {"worker0", "worker1"}  # Both workers took trials.
    assert spread.stats["mode"] == "chief + 2 workers" and local.stats["mode"] == "in-process"
    for result in (local, spread):
        assert result.stats["trials_per_hour"] > 0 and result.stats["overhead_seconds_per_trial"] >= 0
    # The figures a reader compares (this tiny grid is dominated by the workers' start-up).
    print(json.dumps({"in_process": local.stats, "two_workers": spread.stats}, indent=2))


def test_a_rerun_keeps_finished_trials_and_a_changed_request_starts_fresh(dataset, tmp_path, capsys):
    request = _request(dataset, search_space={"learning_rate": [1e-3, 1e-4], "batch_size": [64], "dropout_rate": [0.1]})
    first = tuning.search(request, dataset.x_train, dataset.y_train, directory=tmp_path, verbose=0)
    again = tuning.search(request, dataset.x_train, dataset.y_train, directory=tmp_path, verbose=0)
    assert again.stats["trials_run_now"] == 0 and again.stats["trials_resumed"] == 2
    pd.testing.assert_frame_equal(first.trials[RESULTS], again.trials[RESULTS])
    assert "2 of 2 trials done before, resuming" in capsys.readouterr().err
    other = _request(dataset, search_space=request.search_space, train_subset=500)
    changed = tuning.search(other, dataset.x_train, dataset.y_train, directory=tmp_path, verbose=0)
    assert changed.stats["trials_run_now"] == 2
    assert "is for other parameters, data or code; starting fresh" in capsys.readouterr().err
    assert [path.name for path in tmp_path.iterdir()] == [f"search_{other.digest}"]


def test_every_trial_logs_its_epochs_and_hyperparameters_for_tensorboard(dataset, tmp_path, tensorboard_log):
    request = _request(dataset, search_space={"learning_rate": [1e-3, 1e-4], "batch_size": [64], "dropout_rate": [0.1]})
    logs, state = tmp_path / "tensorboard", tmp_path / "keras_tuner"
    found = tuning.search(request, dataset.x_train, dataset.y_train, directory=state, verbose=0, tensorboard_dir=logs)
    # keras-tuner gave each trial its own directory, with its values for the HParams dashboard.
    assert sorted(path.name for path in logs.iterdir()) == sorted(found.trials["trial"])
    for trial in found.trials.itertuples():
        run = logs / trial.trial / "execution0"
        hparams = tensorboard_log.hparams(run)
        assert hparams["ended"] and hparams["batch_size"] == 64 and hparams["dropout_rate"] == pytest.approx(0.1)
        assert hparams["learning_rate"] == pytest.approx(trial.learning_rate)
        validation = tensorboard_log.scalars(run / "validation", "epoch_loss")
        assert [step for step, _ in validation] == [0] and validation[0][1] == pytest.approx(trial.val_loss, rel=1e-5)
        assert [step for step, _ in tensorboard_log.scalars(run / "train", "epoch_loss")] == [0]

    def files() -> list[str]:
        return sorted(path.relative_to(logs).as_posix() for path in logs.rglob("*") if path.is_file())

    # Resumed: the finished trials keep their logs; the log of a trial that did not finish (in flight at a
    # kill, so run again) goes.
    kept = files()
    (logs / "7" / "execution0").mkdir(parents=True)
    (logs / "7" / "execution0" / "events.out.tfevents.0.killed").write_bytes(b"")
    again = tuning.search(request, dataset.x_train, dataset.y_train, directory=state, verbose=0, tensorboard_dir=logs)
    assert again.stats["trials_run_now"] == 0 and files() == kept
    # Another request starts afresh, and its trial ids start again: no earlier trial's log may remain.
    other = _request(dataset, search_space={"learning_rate": [1e-3], "batch_size": [64], "dropout_rate": [0.3]})
    fresh = tuning.search(other, dataset.x_train, dataset.y_train, directory=state, verbose=0, tensorboard_dir=logs)
    assert [path.name for path in logs.iterdir()] == list(fresh.trials["trial"])
    assert tensorboard_log.hparams(logs / fresh.trials["trial"][0] / "execution0")["dropout_rate"] == pytest.approx(0.3)


def test_trials_train_through_the_studys_fit(dataset, monkeypatch, tmp_path):
    from fmnist import training

    calls = []
    real_fit = training.fit

    def spy(recipe, *args, **kwargs):
        calls.append(recipe)
        return real_fit(recipe, *args, **kwargs)

    monkeypatch.setattr(training, "fit", spy)
    request = _request(dataset, search_space={"learning_rate": [1e-3], "batch_size": [32], "dropout_rate": [0.3]})
    found = tuning.search(request, dataset.x_train, dataset.y_train, directory=tmp_path, verbose=0)
    assert [(r.learning_rate, r.batch_size, r.dropout_rate) for r in calls] == [(1e-3, 32, 0.3)]
    assert found.best == {"learning_rate": 1e-3, "batch_size": 32, "dropout_rate": 0.3}
    assert isinstance(found.best["batch_size"], int) and np.isfinite(found.trials["val_loss"][0])


def test_a_request_names_what_is_wrong(dataset):
    with pytest.raises(ValueError, match="tuner='bayes'"):
        _request(dataset, tuner="bayes")
    with pytest.raises(ValueError, match="objective='loss'"):
        _request(dataset, objective="loss")
    with pytest.raises(ValueError, match="max_trials=-1"):
        _request(dataset, max_trials=-1)
    request = _request(dataset)
    assert tuning.SearchRequest.from_json(request.to_json()) == request
    assert _request(dataset, seed=8).digest != request.digest


def test_tune_worker_rejects_a_malformed_oracle_address():
    done = subprocess.run(
        [sys.executable, "-m", "fmnist", "tune-worker", "--oracle", "nowhere"], capture_output=True, text=True
    )
    assert done.returncode == 2
    assert "--oracle 'nowhere': give HOST:PORT, as the chief prints it." in done.stderr


def test_a_grid_killed_mid_trial_resumes_every_point_exactly_once(dataset, tmp_path):
    """kill -9 after two of four trials: the rerun redoes at most the trial in flight, and ends as a whole grid."""
    import os
    import signal
    import time

    request = _request(dataset)
    script = (
        "import sys; from pathlib import Path; from fmnist import data, tuning\n"
        "request = tuning.SearchRequest.from_json(sys.argv[1])\n"
        "d = data.load_fashion_mnist(include_test=False)\n"
        "tuning.search(request, d.x_train, d.y_train, directory=Path(sys.argv[2]), verbose=0)\n"
    )
    killed = tmp_path / "killed"
    process = subprocess.Popen(
        [sys.executable, "-c", script, request.to_json(), str(killed)],
        start_new_session=True,
        stderr=subprocess.DEVNULL,
    )

    def finished() -> int:
        return sum('"status": "COMPLETED"' in path.read_text() for path in killed.glob("search_*/trial_*/trial.json"))

    deadline = time.monotonic() + 300
    while finished() < 2 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    done_at_kill = finished()
    assert 2 <= done_at_kill < 4
    resumed = tuning.search(request, dataset.x_train, dataset.y_train, directory=killed, verbose=0)
    assert resumed.stats["trials_resumed"] == done_at_kill
    assert resumed.stats["trials_run_now"] == 4 - done_at_kill  # At most the trial in flight is redone.
    uninterrupted = tuning.search(request, dataset.x_train, dataset.y_train, directory=tmp_path / "whole", verbose=0)
    points = ["learning_rate", "batch_size", "dropout_rate"]
    ordered = [
        frame[RESULTS[1:]].sort_values(points).reset_index(drop=True)
        for frame in (resumed.trials, uninterrupted.trials)
    ]
    pd.testing.assert_frame_equal(*(frame for frame in ordered))
    assert len(resumed.trials[["learning_rate", "dropout_rate"]].drop_duplicates()) == 4


@pytest.mark.slow
def test_a_worker_killed_mid_trial_is_restarted_and_the_search_completes_once(dataset, tmp_path, capsys):
    import os
    import signal
    import threading
    import time

    request = _request(dataset)
    killed: list[int] = []

    def kill_worker1_when_training():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not killed:
            pids = [pid for pid, command in _children() if "tune-worker" in command and "--id worker1" in command]
            oracles = list(tmp_path.glob("search_*/oracle.json"))
            # The chief's saved state says worker1 holds a trial (keras-tuner's files are written atomically).
            if pids and oracles and "worker1" in json.loads(oracles[0].read_text()).get("ongoing_trials", {}):
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])
            time.sleep(0.05)

    killer = threading.Thread(target=kill_worker1_when_training, daemon=True)
    killer.start()
    found = tuning.search(request, dataset.x_train, dataset.y_train, directory=tmp_path, workers=2, verbose=0)
    killer.join(timeout=1)
    assert killed, "worker1 was never seen training"
    err = capsys.readouterr().err
    assert "worker1 exited with -9; restarting it" in err, err
    assert len(found.trials) == 4 and len(found.trials[["learning_rate", "dropout_rate"]].drop_duplicates()) == 4
    local = tuning.search(request, dataset.x_train, dataset.y_train, directory=tmp_path / "local", verbose=0)
    points = ["learning_rate", "batch_size", "dropout_rate"]
    ordered = [frame[RESULTS[1:]].sort_values(points).reset_index(drop=True) for frame in (found.trials, local.trials)]
    pd.testing.assert_frame_equal(*ordered, rtol=1e-3, atol=SUMMATION_ORDER_IMAGES)


def test_a_search_killed_while_creating_a_trial_still_runs_every_point(dataset, tmp_path, monkeypatch):
    """keras-tuner writes a new trial's file, then the oracle's state: stopped between the two, the resumed
    search must still run the whole grid, not count the half-created trial and end a point short."""
    import keras_tuner

    request = _request(dataset)
    real_save = keras_tuner.Oracle.save

    class Killed(Exception):
        pass

    def save_unless_third_trial(oracle):
        if len(oracle.trials) == 3 and oracle.trials[max(oracle.trials)].status == "RUNNING":
            raise Killed  # The third trial's file is written; the oracle's state is not.
        real_save(oracle)

    monkeypatch.setattr(keras_tuner.Oracle, "save", save_unless_third_trial)
    with pytest.raises(Killed):
        tuning.search(request, dataset.x_train, dataset.y_train, directory=tmp_path / "killed", verbose=0)
    monkeypatch.setattr(keras_tuner.Oracle, "save", real_save)
    (project,) = (tmp_path / "killed").glob("search_*")
    states = {path.parent.name: json.loads(path.read_text())["status"] for path in project.glob("trial_*/trial.json")}
    assert sorted(states.values()) == ["COMPLETED", "COMPLETED", "RUNNING"]
    resumed = tuning.search(request, dataset.x_train, dataset.y_train, directory=tmp_path / "killed", verbose=0)
    assert resumed.stats["trials_resumed"] == 2 and resumed.stats["trials_run_now"] == 2
    uninterrupted = tuning.search(request, dataset.x_train, dataset.y_train, directory=tmp_path / "whole", verbose=0)
    points = ["learning_rate", "batch_size", "dropout_rate"]
    ordered = [
        frame[RESULTS[1:]].sort_values(points).reset_index(drop=True)
        for frame in (resumed.trials, uninterrupted.trials)
    ]
    pd.testing.assert_frame_equal(*ordered, atol=SUMMATION_ORDER_IMAGES)


def test_only_trials_the_oracle_never_started_and_above_every_started_one_are_dropped(tmp_path):
    def project(start_order, trials):
        directory = tmp_path / f"project{len(list(tmp_path.iterdir()))}"
        for trial_id, status in trials.items():
            (directory / f"trial_{trial_id}").mkdir(parents=True)
            (directory / f"trial_{trial_id}" / "trial.json").write_text(json.dumps({"status": status}))
        state = {"start_order": start_order, "ongoing_trials": {}, "retry_queue": start_order[1:]}
        (directory / "oracle.json").write_text(json.dumps(state))
        return directory

    # Trials queued for retry (RUNNING on disk, not ongoing: a chief killed after reloading) are kept; the one
    # created after the state was last saved is dropped.
    queued = project(["0", "1", "2"], {"0": "COMPLETED", "1": "RUNNING", "2": "RUNNING", "3": "RUNNING"})
    assert tuning._drop_orphaned_trials(queued) == ["3"]
    assert sorted(path.name for path in queued.glob("trial_*")) == ["trial_0", "trial_1", "trial_2"]
    # An orphan below a started trial (left by an earlier version) stays: a new trial would take a used id.
    older = project(["0", "1", "3"], {"0": "COMPLETED", "1": "COMPLETED", "2": "RUNNING", "3": "COMPLETED"})
    assert tuning._drop_orphaned_trials(older) == []
    assert tuning._drop_orphaned_trials(tmp_path / "no state yet") == []
