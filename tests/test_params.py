"""Params profiles are checked against the notebooks' parameters cells before any compute."""

from __future__ import annotations

import shutil

import pytest

from fmnist.config import PARAMS_DIR
from fmnist.params import ParamsError, load_profile


@pytest.fixture
def profile(tmp_path):
    target = tmp_path / "profile"
    shutil.copytree(PARAMS_DIR / "smoke", target)
    return target


@pytest.mark.parametrize("directory", [PARAMS_DIR, PARAMS_DIR / "smoke"])
def test_shipped_profiles_are_valid(directory):
    profile = load_profile(directory)
    assert profile["02_tune"]["validation_size"] == profile["03_train"]["validation_size"]
    assert all("seed" in profile[stage] for stage in ("01_eda", "02_tune", "03_train", "04_evaluate"))


def test_full_profile_trains_the_seed_network_with_what_validation_chose():
    profile = load_profile(PARAMS_DIR)
    training = profile["03_train"]
    assert training["train_subset"] == 0 and training["patience"] > 0
    assert training["schedule"] == "cosine" and training["horizontal_flip"] is True and training["shift_pixels"] > 0
    assert profile["02_tune"]["max_trials"] == 0 and profile["02_tune"]["tuner"] == "grid"
    assert profile["02_tune"]["objective"] == "val_loss"


def test_the_multi_seed_evidence_is_for_the_studys_training_recipe():
    # 06_experiments' seed_study must train exactly as 03_train does, with the tuned values, so its
    # mean over seeds describes the study's model.
    profile = load_profile(PARAMS_DIR)
    training, experiments = profile["03_train"], profile["06_experiments"]
    recipe = experiments["recipes"]["seed_study"]
    assert recipe.pop("tuned") is True
    assert recipe == {key: training[key] for key in recipe}
    assert set(recipe) == {"epochs", "patience", "schedule", "horizontal_flip", "shift_pixels"}
    assert experiments["train_subset"] == training["train_subset"] == 0
    assert experiments["validation_size"] == training["validation_size"]


def test_mistyped_key_is_an_error_with_a_suggestion(profile):
    (profile / "03_train.yaml").write_text("epochs: 1\npatiense: 3\n")
    with pytest.raises(ParamsError, match=r"03_train.yaml: unknown parameter 'patiense'. Did you mean 'patience'\?"):
        load_profile(profile)


def test_wrong_type_is_an_error(profile):
    (profile / "03_train.yaml").write_text("epochs: ten\n")
    with pytest.raises(ParamsError, match=r"epochs='ten' is a str; the notebook declares epochs: int"):
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
