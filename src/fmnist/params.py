"""Params profiles: one YAML file per stage, checked against the notebooks before any compute.

A profile is a directory (``params/`` for the full study, ``params/smoke/`` for
the tiny one) holding ``NN_stage.yaml`` files and an optional ``common.yaml``
whose keys go to every stage that declares them (``seed``, ``validation_size``).
The notebook's own ``parameters`` cell is the schema: a key it does not declare,
or a value of another type, is an error that names the file and the fix.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml

from fmnist.config import ALL_STAGES
from fmnist.recipes import check_stage_params
from fmnist.stage import declared_parameters

COMMON_FILE = "common.yaml"
# Set by the runner for every stage, never by a params file.
RUNNER_KEYS = ("out_dir",)

_TYPE_NAMES = {"int": (int,), "float": (float, int), "str": (str,), "bool": (bool,), "list": (list,), "dict": (dict,)}


class ParamsError(ValueError):
    """A params profile does not fit the notebooks."""


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        content = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ParamsError(f"{path}: not valid YAML ({error}).") from error
    if not isinstance(content, dict):
        raise ParamsError(f"{path}: must be a mapping of parameter names to values, got {type(content).__name__}.")
    return content


def _check_value(path: Path, key: str, value: Any, declared: dict[str, Any]) -> None:
    type_name = declared.get("inferred_type_name", "None")
    allowed = _TYPE_NAMES.get(type_name)
    if allowed is None:
        return
    # A bool is an int to Python, but never a sensible value for a numeric parameter.
    if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
        raise ParamsError(
            f"{path}: {key}={value!r} is a {type(value).__name__}; the notebook declares {key}: {type_name} "
            f"(default {declared.get('default')}). Give a {type_name}."
        )


def _unknown_key_error(path: Path, key: str, known: list[str]) -> ParamsError:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ParamsError(f"{path}: unknown parameter {key!r}.{hint} The notebook declares: {', '.join(sorted(known))}.")


def load_profile(params_dir: str | Path, stages: tuple[str, ...] = ALL_STAGES) -> dict[str, dict[str, Any]]:
    """Read and validate a whole profile; return the parameters to inject into each stage."""
    params_dir = Path(params_dir)
    if not params_dir.is_dir():
        raise ParamsError(f"{params_dir}: params directory not found. Use params/ or params/smoke/.")
    all_stages = ALL_STAGES
    expected_files = {COMMON_FILE} | {f"{stage}.yaml" for stage in all_stages}
    for path in sorted(params_dir.glob("*.y*ml")):
        if path.name not in expected_files:
            raise _unknown_key_error(path.parent, path.name, sorted(expected_files))
    declared = {stage: declared_parameters(stage) for stage in all_stages}

    common_path = params_dir / COMMON_FILE
    common = _read_yaml(common_path) if common_path.is_file() else {}
    for key, value in common.items():
        users = [stage for stage in all_stages if key in declared[stage]]
        if not users or key in RUNNER_KEYS:
            known = sorted({k for stage in all_stages for k in declared[stage]} - set(RUNNER_KEYS))
            raise _unknown_key_error(common_path, key, known)
        for stage in users:
            _check_value(common_path, key, value, declared[stage][key])

    profile = {}
    for stage in stages:
        path = params_dir / f"{stage}.yaml"
        values = _read_yaml(path) if path.is_file() else {}
        known = [key for key in declared[stage] if key not in RUNNER_KEYS]
        for key, value in values.items():
            if key not in known:
                raise _unknown_key_error(path, key, known)
            _check_value(path, key, value, declared[stage][key])
        shared = {key: value for key, value in common.items() if key in declared[stage]}
        profile[stage] = {**shared, **values}
    if "06_experiments" in profile:
        path = params_dir / "06_experiments.yaml"
        try:
            recipes = profile["06_experiments"].get("recipes")
            if recipes is not None:
                train_recipe = profile.get("03_train", {}).get("recipe", declared["03_train"]["recipe"]["default"])
                profile["06_experiments"]["recipes"] = resolve_recipe_references(recipes, train_recipe)
            check_stage_params(path, profile["06_experiments"])
        except ValueError as error:
            raise ParamsError(f"{path}: {error}" if str(path) not in str(error) else str(error)) from error
    return profile


def resolve_recipe_references(recipes: dict[str, Any], train_recipe: Any) -> dict[str, Any]:
    """Replace a recipe given as ``03_train`` by that stage's ``recipe`` mapping, so it is written once."""
    import ast

    if isinstance(train_recipe, str):  # papermill reports a notebook's default as its source text.
        train_recipe = ast.literal_eval(train_recipe)
    resolved = {}
    for name, fields in recipes.items():
        if isinstance(fields, str):
            if fields != "03_train":
                raise ValueError(f"recipe {name!r}: {fields!r} names no stage; give a mapping of fields or '03_train'.")
            fields = dict(train_recipe)
        resolved[name] = fields
    return resolved
