"""Params profiles are checked against the notebooks' parameters cells before any compute."""

from __future__ import annotations

import shutil

import pytest
import yaml

from fmnist.config import PARAMS_DIR
from fmnist.params import ParamsError, load_profile


@pytest.fixture
def profile(tmp_path):
    target = tmp_path / "profile"
    shutil.copytree(PARAMS_DIR / "smoke", target)
    return target


@pytest.mark.parametrize("directory", [PARAMS_DIR, PARAMS_DIR / "smoke", PARAMS_DIR / "seed_budget"])
def test_shipped_profiles_are_valid(directory):
    profile = load_profile(directory)
    assert profile["02_tune"]["validation_size"] == profile["03_train"]["validation_size"]
    assert all("seed" in profile[stage] for stage in ("01_eda", "02_tune", "03_train", "04_evaluate"))


def test_full_profile_trains_the_seed_network_with_what_validation_chose():
    profile = load_profile(PARAMS_DIR)
    training, recipe = profile["03_train"], profile["03_train"]["recipe"]
    assert training["train_subset"] == 0 and recipe["patience"] > 0 and recipe["tuned"] is True
    assert recipe["schedule"] == "cosine" and recipe["horizontal_flip"] is True and recipe["shift_pixels"] > 0
    assert profile["02_tune"]["max_trials"] == 0 and profile["02_tune"]["tuner"] == "grid"
    assert profile["02_tune"]["objective"] == "val_loss"


def test_the_multi_seed_evidence_is_for_the_studys_training_recipe():
    # 06_experiments' seed_study must train exactly as 03_train does, with the tuned values, so its
    # mean over seeds describes the study's model: it names 03_train's recipe instead of repeating it.
    assert yaml.safe_load((PARAMS_DIR / "06_experiments.yaml").read_text())["recipes"]["seed_study"] == "03_train"
    profile = load_profile(PARAMS_DIR)
    training, experiments = profile["03_train"], profile["06_experiments"]
    assert experiments["recipes"]["seed_study"] == training["recipe"]
    assert experiments["train_subset"] == training["train_subset"] == 0
    assert experiments["validation_size"] == training["validation_size"]


def test_a_recipe_reference_must_name_the_training_stage(profile):
    text = (
        (profile / "06_experiments.yaml")
        .read_text()
        .replace("seed_tuned: {tuned: true, epochs: 1}", "seed_tuned: 04_evaluate")
    )
    (profile / "06_experiments.yaml").write_text(text)
    with pytest.raises(ParamsError, match="'04_evaluate' names no stage; give a mapping of fields or '03_train'"):
        load_profile(profile)


def test_the_seed_budget_profile_is_the_seeds_own_tuning_budget():
    tune = load_profile(PARAMS_DIR / "seed_budget")["02_tune"]
    assert (tune["tuner"], tune["max_trials"], tune["train_subset"]) == ("grid", 0, 0)
    assert (tune["tuning_epochs"], tune["patience"], tune["objective"]) == (10, 3, "val_loss")
    assert tune["workers"] == 2


def test_mistyped_key_is_an_error_with_a_suggestion(profile):
    (profile / "03_train.yaml").write_text("train_subset: 1\nrecipy: {}\n")
    with pytest.raises(ParamsError, match=r"03_train.yaml: unknown parameter 'recipy'. Did you mean 'recipe'\?"):
        load_profile(profile)


def test_wrong_type_is_an_error(profile):
    (profile / "03_train.yaml").write_text("train_subset: ten\n")
    with pytest.raises(ParamsError, match=r"train_subset='ten' is a str; the notebook declares train_subset: int"):
        load_profile(profile)


def test_bool_is_not_an_int(profile):
    (profile / "02_tune.yaml").write_text("max_trials: true\n")
    with pytest.raises(ParamsError, match="max_trials=True is a bool"):
        load_profile(profile)


def test_unknown_common_key_and_unknown_file_are_errors(profile):
    (profile / "common.yaml").write_text("sed: 3\n")
    with pytest.raises(ParamsError, match=r"common.yaml: unknown parameter 'sed'. Did you mean 'seed'\?"):
        load_profile(profile)
    (profile / "common.yaml").write_text("seed: 3\n")
    (profile / "03_trian.yaml").write_text("epochs: 1\n")
    with pytest.raises(ParamsError, match=r"unknown parameter '03_trian.yaml'. Did you mean '03_train.yaml'\?"):
        load_profile(profile)


def test_runner_owned_keys_cannot_be_set(profile):
    (profile / "01_eda.yaml").write_text("out_dir: /tmp/elsewhere\n")
    with pytest.raises(ParamsError, match="unknown parameter 'out_dir'"):
        load_profile(profile)


def test_invalid_yaml_and_missing_directory(profile, tmp_path):
    (profile / "01_eda.yaml").write_text("- just\n- a list\n")
    with pytest.raises(ParamsError, match="must be a mapping"):
        load_profile(profile)
    with pytest.raises(ParamsError, match="params directory not found"):
        load_profile(tmp_path / "nowhere")


def test_a_bad_recipe_is_an_error_before_any_stage_runs(profile):
    (profile / "06_experiments.yaml").write_text("recipes:\n  fast: {architecture: bn_cnn, epoch: 3}\n")
    with pytest.raises(ParamsError, match=r"06_experiments.yaml: recipe 'fast': unknown field 'epoch'. Did you mean"):
        load_profile(profile)
    (profile / "06_experiments.yaml").write_text(
        "recipes:\n  a: {}\nablation_base: b\nablations:\n  a_x: {epochs: 2}\n"
    )
    with pytest.raises(ParamsError, match=r"ablation_base='b' is not one of the recipes"):
        load_profile(profile)
