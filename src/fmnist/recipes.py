"""Training recipes: an architecture plus everything about how it is trained and evaluated.

A recipe is written in a params file as a mapping of the fields below that
differ from the defaults (the seed's architecture and tuned values, trained as
in the study). ``Recipe.from_params`` rejects unknown fields and wrong types
with the fix in the message, before anything trains.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from typing import Any

from fmnist.config import SEED_HYPERPARAMETERS

SCHEDULES = ("constant", "cosine")
OPTIMIZERS = ("adam", "sgd")
# "auto" trains in bfloat16 mixed precision where the CPU has native bf16 (avx512_bf16 or amx_bf16), else float32.
PRECISIONS = ("auto", "float32", "bfloat16")
# The network families of fmnist.model, and the fields only bn_cnn takes.
ARCHITECTURES = ("seed", "bn_cnn")
BN_CNN_FIELDS = ("width", "stages", "batch_norm", "head", "separable_stages")
# The fields that change only how a trained model is evaluated: a stored run is evaluated again, not retrained.
EVALUATION_FIELDS = ("tta", "tta_shifts")
HEADS = ("gap", "flatten")


@dataclass(frozen=True)
class Recipe:
    """How one model is built, trained and evaluated."""

    name: str
    architecture: str = "seed"  # "seed" or "bn_cnn" (see fmnist.model).
    width: int = 32  # bn_cnn: filters of the first stage, doubled per stage.
    stages: tuple[int, ...] = (1, 1, 2)  # bn_cnn: convolutions per resolution (28, 14, 7 pixels).
    batch_norm: bool = True  # bn_cnn: batch normalisation after every convolution.
    head: str = "gap"  # bn_cnn: "gap" (global average pooling) or "flatten" (keeps where the features are).
    # bn_cnn: the stages (numbered from 1; not the first) whose first convolution is depthwise-separable.
    separable_stages: tuple[int, ...] = ()
    learning_rate: float = SEED_HYPERPARAMETERS["learning_rate"]
    batch_size: int = SEED_HYPERPARAMETERS["batch_size"]
    dropout_rate: float = SEED_HYPERPARAMETERS["dropout_rate"]
    epochs: int = 10
    patience: int = 3  # Early stopping on validation loss, best weights restored; 0 trains every epoch.
    schedule: str = "constant"  # Learning rate: "constant" or "cosine" (decays to 0 over the epochs).
    label_smoothing: float = 0.0
    shift_pixels: int = 0  # Augmentation: random shifts of up to this many pixels each way.
    horizontal_flip: bool = False  # Augmentation: mirror left-right (never upside down: clothes have an up).
    erasing: float = 0.0  # Augmentation: probability of erasing a random rectangle (random erasing).
    tta: bool = False  # Test-time augmentation in the test figures: the mean over the views below.
    # Test-time augmentation's views: the image and its mirror image; with 1 or more, also the image shifted this
    # many whole pixels up, down, left and right, each with its mirror image (10 views in all). Measured whatever
    # ``tta`` says (the "with TTA" column); ``tta`` decides whether the recipe's test figures use it.
    tta_shifts: int = 0
    optimizer: str = "adam"  # "adam", or "sgd" (Nesterov momentum 0.9).
    weight_decay: float = 0.0  # Decoupled weight decay (AdamW's for Adam), scaled by the learning rate each step.
    warmup_epochs: int = 0  # Linear warm-up from 0 before the cosine decay: a one-cycle shape.
    precision: str = "auto"  # "auto", "float32" or "bfloat16" (mixed: bf16 compute, float32 weights).
    teacher: str = ""  # Distillation (06_experiments): the recipe whose model of the same seed gives soft targets.
    teacher_weight: float = 0.9  # Distillation: the targets' share of the teacher's probabilities (the rest: labels).
    # Distillation: the teacher's probabilities are softened as by dividing its logits by this (1: as they are).
    # The student trains at temperature 1 on them, so above 1 it learns to answer less confidently.
    temperature: float = 1.0
    tuned: bool = False  # Take learning_rate, batch_size and dropout_rate from the 02_tune stage's result.
    # Quantisation-aware fine-tuning after the training (fmnist.quantisation.fine_tune): epochs of it (0: none),
    # its learning rate (decayed to 0 along a cosine), and the weight of the term that keeps the int8 model's
    # probabilities on the float model's.
    quantisation_aware_epochs: int = 0
    quantisation_aware_learning_rate: float = 1e-4
    consistency_weight: float = 1000.0
    # Hard-image selection (fmnist.training.epoch_plan): after hard_plain_epochs epochs over every image, each epoch
    # trains on the hard_share of images with the highest loss when last trained on, plus hard_rest_share of the
    # others drawn at random; the images seen stay epochs x the training images, spread over more, shorter epochs.
    # 0 (the default): every epoch sees every image.
    hard_share: float = 0.0
    hard_rest_share: float = 0.2
    hard_plain_epochs: int = 3
    # The final fit (06_experiments): this other recipe's network, trained on the training and validation splits
    # together (all 60,000 training images). That recipe's runs were judged on their validation split; nothing is
    # chosen on this one, so it records no validation figures, and the shipping rule reads that recipe's.
    final_fit_of: str = ""

    def __post_init__(self):
        # A list from YAML and a tuple compare unequal: keep one form.
        object.__setattr__(self, "stages", tuple(self.stages))
        object.__setattr__(self, "separable_stages", tuple(self.separable_stages))
        problems = []
        if self.architecture not in ARCHITECTURES:
            problems.append(f"architecture={self.architecture!r} is not one of {', '.join(ARCHITECTURES)}")
        if self.head not in HEADS:
            problems.append(f"head={self.head!r} is not one of {', '.join(HEADS)}")
        if self.schedule not in SCHEDULES:
            problems.append(f"schedule={self.schedule!r} is not one of {', '.join(SCHEDULES)}")
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"optimizer={self.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
        if self.precision not in PRECISIONS:
            problems.append(f"precision={self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if not 0.0 <= self.weight_decay < 1.0:
            problems.append(f"weight_decay={self.weight_decay} must be in [0, 1)")
        if not 0 <= self.warmup_epochs < self.epochs:
            problems.append(f"warmup_epochs={self.warmup_epochs} must be at least 0 and below epochs={self.epochs}")
        if self.warmup_epochs and self.schedule != "cosine":
            problems.append("warmup_epochs needs schedule: cosine (the warm-up leads into the cosine decay)")
        if self.teacher and not 0.0 < self.teacher_weight <= 1.0:
            problems.append(f"teacher_weight={self.teacher_weight} must be in (0, 1]")
        if self.temperature <= 0:
            problems.append(f"temperature={self.temperature} must be positive")
        if self.teacher == self.name:
            problems.append("a recipe cannot be its own teacher")
        if self.final_fit_of == self.name:
            problems.append("a recipe cannot be the final fit of itself")
        if self.final_fit_of and self.patience:
            problems.append(
                f"patience={self.patience} stops early on the validation split, which a final fit trains on: "
                "give patience: 0 (train every epoch)"
            )
        for name in ("learning_rate", "batch_size", "epochs"):
            if getattr(self, name) <= 0:
                problems.append(f"{name}={getattr(self, name)} must be positive")
        if self.patience < 0:
            problems.append(f"patience={self.patience} must not be negative")
        for name in ("dropout_rate", "label_smoothing"):
            if not 0.0 <= getattr(self, name) < 1.0:
                problems.append(f"{name}={getattr(self, name)} must be in [0, 1)")
        if not 0.0 <= self.erasing <= 1.0:
            problems.append(f"erasing={self.erasing} must be a probability")
        for name in ("shift_pixels", "tta_shifts"):
            if not 0 <= getattr(self, name) < 14:
                problems.append(f"{name}={getattr(self, name)} must be between 0 and 13")
        if len(set(self.separable_stages)) != len(self.separable_stages) or not all(
            2 <= stage <= len(self.stages) for stage in self.separable_stages
        ):
            problems.append(
                f"separable_stages={list(self.separable_stages)} must name distinct stages from 2 to "
                f"{len(self.stages)} (stage 1 sees the one-channel image, where a separable convolution saves nothing)"
            )
        network_defaults = {f.name: f.default for f in dataclasses.fields(self) if f.name in BN_CNN_FIELDS}
        if self.architecture == "seed" and any(getattr(self, k) != v for k, v in network_defaults.items()):
            problems.append(
                "width, stages, batch_norm, head and separable_stages belong to bn_cnn; the seed architecture is fixed"
            )
        if not 0.0 <= self.hard_share < 1.0:
            problems.append(f"hard_share={self.hard_share} must be in [0, 1) (0: every epoch sees every image)")
        if not 0.0 <= self.hard_rest_share <= 1.0:
            problems.append(f"hard_rest_share={self.hard_rest_share} must be in [0, 1]")
        if self.hard_share and not 1 <= self.hard_plain_epochs < self.epochs:
            problems.append(
                f"hard_plain_epochs={self.hard_plain_epochs} must be at least 1 (the images' losses are known only "
                f"once each was trained on) and below epochs={self.epochs} (the budget, in passes over the images)"
            )
        if self.quantisation_aware_epochs < 0:
            problems.append(f"quantisation_aware_epochs={self.quantisation_aware_epochs} must not be negative")
        if self.quantisation_aware_learning_rate <= 0:
            problems.append(
                f"quantisation_aware_learning_rate={self.quantisation_aware_learning_rate} must be positive"
            )
        if self.consistency_weight < 0:
            problems.append(f"consistency_weight={self.consistency_weight} must not be negative")
        if problems:
            raise ValueError(f"recipe {self.name!r}: " + "; ".join(problems) + ".")

    @property
    def final_fit(self) -> bool:
        """Whether this recipe trains on the validation split too (``final_fit_of``)."""
        return bool(self.final_fit_of)

    @property
    def augments(self) -> bool:
        return bool(self.shift_pixels or self.horizontal_flip or self.erasing)

    def network_options(self) -> dict[str, Any]:
        if self.architecture == "seed":
            return {}
        return {name: getattr(self, name) for name in BN_CNN_FIELDS}

    def with_hyperparameters(self, values: dict[str, Any]) -> Recipe:
        """A copy with ``learning_rate``, ``batch_size`` and ``dropout_rate`` from ``values``."""
        chosen = {key: values[key] for key in ("learning_rate", "batch_size", "dropout_rate")}
        return dataclasses.replace(self, **chosen)

    def evaluated_as(self, other: Recipe) -> Recipe:
        """This recipe's training with ``other``'s evaluation (the fields of ``EVALUATION_FIELDS``)."""
        return dataclasses.replace(self, **{name: getattr(other, name) for name in EVALUATION_FIELDS})

    def as_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        # As JSON stores them, so stored runs compare equal.
        values["stages"] = list(self.stages)
        values["separable_stages"] = list(self.separable_stages)
        return values

    @classmethod
    def from_params(cls, name: str, values: dict[str, Any], *, base: Recipe | None = None) -> Recipe:
        """A recipe from a params-file mapping; ``base`` supplies the fields it does not give."""
        if not isinstance(values, dict):
            raise ValueError(f"recipe {name!r}: expected a mapping of fields, got {type(values).__name__}.")
        fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "name"}
        defaults = base.as_dict() if base else {}
        for key, value in values.items():
            if key not in fields:
                close = difflib.get_close_matches(key, list(fields), n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise ValueError(f"recipe {name!r}: unknown field {key!r}.{hint} Fields: {', '.join(fields)}.")
            expected = _field_type(cls, key)
            if not _fits(value, expected):
                raise ValueError(
                    f"recipe {name!r}: {key}={value!r} is a {type(value).__name__}; give a {expected.__name__}."
                )
        merged = {**{k: v for k, v in defaults.items() if k != "name"}, **values}
        return cls(name=name, **merged)


def _field_type(cls, key: str) -> type:
    default = next(f.default for f in dataclasses.fields(cls) if f.name == key)
    return type(default)


def _fits(value: Any, expected: type) -> bool:
    if isinstance(value, bool) != (expected is bool):
        return False
    if expected is float:
        return isinstance(value, int | float)
    if expected is tuple:
        return isinstance(value, list | tuple) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    return isinstance(value, expected)


# What a final fit may change of the recipe it refits: besides its name and final_fit_of, its epochs (to keep the
# training compute on more images) and its teacher (the final fit of the refitted recipe's teacher).
FINAL_FIT_CHANGES = ("name", "final_fit_of", "epochs", "teacher")


def _check_final_fit(recipe: Recipe, by_name: dict[str, Recipe]) -> None:
    """A final fit trains the recipe it names with that recipe's settings (``FINAL_FIT_CHANGES`` aside)."""
    judged_by = by_name.get(recipe.final_fit_of)
    if judged_by is None or judged_by.final_fit:
        raise ValueError(
            f"recipe {recipe.name!r}: final_fit_of={recipe.final_fit_of!r} must name a recipe of this file "
            "that trains on the training split alone: its validation figures judge this one."
        )
    differences = [
        f"{field.name} {getattr(recipe, field.name)!r} (not {getattr(judged_by, field.name)!r})"
        for field in dataclasses.fields(Recipe)
        if field.name not in FINAL_FIT_CHANGES and getattr(recipe, field.name) != getattr(judged_by, field.name)
    ]
    if differences:
        raise ValueError(
            f"recipe {recipe.name!r}: a final fit trains {judged_by.name!r} as its validation figures judged it; "
            f"only {', '.join(FINAL_FIT_CHANGES[2:])} may differ, not {'; '.join(differences)}."
        )
    if bool(recipe.teacher) != bool(judged_by.teacher) or (
        recipe.teacher and by_name[recipe.teacher].final_fit_of != judged_by.teacher
    ):
        raise ValueError(
            f"recipe {recipe.name!r}: a final fit of {judged_by.name!r} learns from the final fit of its teacher "
            f"({judged_by.teacher or 'none'}), not from {recipe.teacher or 'labels alone'!r}."
        )


def check_stage_params(path, values: dict[str, Any]) -> None:
    """Validate the recipes a params file gives (called by ``fmnist.params`` before any stage runs)."""
    if "recipes" not in values:
        return
    try:
        recipes_from_params(values["recipes"], values.get("ablations", {}), values.get("ablation_base", ""))
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from error


def recipes_from_params(
    recipes: dict[str, dict[str, Any]], ablations: dict[str, dict[str, Any]], ablation_base: str
) -> tuple[list[Recipe], list[Recipe]]:
    """The main recipes and the ablations (each a change to ``ablation_base``) of a params file."""
    main = [Recipe.from_params(name, values) for name, values in recipes.items()]
    by_name = {recipe.name: recipe for recipe in main}
    for position, recipe in enumerate(main):
        earlier = [other.name for other in main[:position]]
        if recipe.teacher and recipe.teacher not in earlier:
            raise ValueError(
                f"recipe {recipe.name!r}: teacher {recipe.teacher!r} must be one of the recipes listed before it "
                f"({', '.join(earlier) or 'none'}), so that its models exist when the student trains."
            )
        if recipe.teacher and not recipe.final_fit and by_name[recipe.teacher].final_fit:
            raise ValueError(
                f"recipe {recipe.name!r}: its teacher {recipe.teacher!r} is a final fit, which trained on this "
                "recipe's validation images: they would judge a student that learnt their answers. Only a final "
                "fit may learn from a final fit."
            )
        if recipe.final_fit_of:
            _check_final_fit(recipe, by_name)
    if ablations and ablation_base in by_name and by_name[ablation_base].final_fit:
        raise ValueError(
            f"ablation_base={ablation_base!r} is a final fit: it has no validation figures for the ablations to "
            "be judged against; name the recipe it refits."
        )
    if ablations and ablation_base not in by_name:
        raise ValueError(
            f"ablation_base={ablation_base!r} is not one of the recipes ({', '.join(by_name)}); "
            "ablations change one ingredient of a recipe that is also trained in full."
        )
    clashes = set(ablations) & set(by_name)
    if clashes:
        raise ValueError(f"ablations {sorted(clashes)} reuse recipe names; give each ablation its own name.")
    varied = [Recipe.from_params(name, values, base=by_name.get(ablation_base)) for name, values in ablations.items()]
    for recipe in varied:
        # An ablation is judged on its validation split against its base: no final fit, and no final-fit teacher.
        if recipe.final_fit or (recipe.teacher in by_name and by_name[recipe.teacher].final_fit):
            raise ValueError(
                f"ablation {recipe.name!r}: an ablation is judged on its validation split, so it can neither be a "
                "final fit nor learn from one (its teacher trained on those images)."
            )
    return main, varied
