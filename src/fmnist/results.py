"""The experiments' results as tables: means over seeds, the ablation, the comparison, calibration.

Pure Python and pandas (no TensorFlow), so the report can use it; the
06_experiments stage writes the per-run files these functions read.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fmnist.config import ExperimentsLayout
from fmnist.recipes import Recipe


def _mean_std(values: list[float]) -> tuple[float, float]:
    array = np.asarray(values, dtype=float)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0


def summarise(results: list[dict[str, Any]], latency: dict[str, dict] | None = None) -> list[dict[str, Any]]:
    """One row per recipe: mean and standard deviation over its seeds, cost, speed and size."""
    latency = latency or {}
    by_recipe: dict[str, list[dict[str, Any]]] = {}
    for result in results:
        by_recipe.setdefault(result["recipe"]["name"], []).append(result)
    rows = []
    for name, runs in by_recipe.items():
        accuracy, accuracy_std = _mean_std([run["test"]["accuracy"] for run in runs])
        loss, loss_std = _mean_std([run["test"]["loss"] for run in runs])
        ece, _ = _mean_std([run["test"]["ece"] for run in runs])
        # Both evaluations of the same weights, whatever the recipe reports: the TTA column shows its effect.
        without_tta, _ = _mean_std([run["test_without_tta"]["accuracy"] for run in runs])
        with_tta, _ = _mean_std([run["test_with_tta"]["accuracy"] for run in runs])
        # The evidence a TTA decision may use: its effect on validation (runs from before it was recorded lack it).
        tta_gains = [
            run["validation_tta"]["accuracy_with"] - run["validation_tta"]["accuracy_without"]
            for run in runs
            if run.get("validation_tta")
        ]
        recipe = runs[0]["recipe"]
        # A final fit (recipe final_fit_of) trained on its validation split: it has no validation figures.
        validated = [run["validation"]["accuracy"] for run in runs if run.get("validation")]
        validation = _mean_std(validated)[0] if validated else None
        achieved = [
            run["compute"]["achieved_gflops"] for run in runs if (run.get("compute") or {}).get("achieved_gflops")
        ]
        int8 = latency.get(ExperimentsLayout.litert_name(name, "int8"), {})
        float32 = latency.get(ExperimentsLayout.litert_name(name, "float32"), {})
        # A TTA recipe answers with every view: 2 calls, or 10 with its shifted views.
        shifts = recipe.get("tta_shifts", 0)
        key = ("shift_tta_p50_ms" if shifts else "tta_p50_ms") if recipe["tta"] else "p50_ms"
        rows.append(
            {
                "recipe": name,
                "architecture": recipe["architecture"],
                "tta": recipe["tta"],
                "tta_shifts": shifts,
                "seeds": len(runs),
                "test_accuracy_mean": accuracy,
                "test_accuracy_std": accuracy_std,
                "test_loss_mean": loss,
                "test_loss_std": loss_std,
                "ece_mean": ece,
                "test_accuracy_without_tta_mean": without_tta,
                "test_accuracy_with_tta_mean": with_tta,
                "validation_tta_gain_mean": float(np.mean(tta_gains)) if tta_gains else None,
                "parameters": runs[0]["parameters"],
                "multiply_adds": runs[0]["multiply_adds"],
                "epochs_run_mean": float(np.mean([run["epochs_run"] for run in runs])),
                # Passes over the training images: the epochs, unless a hard-image recipe made them shorter.
                "passes_mean": float(np.mean([images_seen(run) / run["train_images"] for run in runs])),
                "validation_accuracy_mean": validation,
                # Training compute: 6 FLOPs per multiply-add per image seen (runs before it was recorded too).
                "training_tflops_mean": float(np.mean([training_tflops(run) for run in runs])),
                "achieved_gflops_mean": float(np.mean(achieved)) if achieved else None,
                "precision": sorted({run.get("precision", "float32") for run in runs}),
                "teacher": recipe.get("teacher") or None,
                "machines": sorted({run.get("machine", "not recorded") for run in runs}),
                "train_seconds_mean": float(np.mean([training_seconds(run) for run in runs])),
                "litert_float32_p50_ms": float32.get(key),
                "litert_int8_p50_ms": int8.get(key),
                "litert_int8_kb": int8["size_bytes"] / 1024 if int8 else None,
                # Figures kept from an earlier run were measured there (before machines were recorded: AVX2 EPYC).
                "latency_machine": int8.get("machine", "an earlier run's machine") if int8 else None,
            }
        )
    return rows


def tta_label(shifts: int) -> str:
    """How many views a recipe's TTA averages (the notebook says which)."""
    return "10 views" if shifts else "2 views"


def training_seconds(run: dict[str, Any]) -> float:
    """A run's training time, with its quantisation-aware fine-tuning's, if any (not its teacher's)."""
    fine_tuning = (run.get("quantisation_aware") or {}).get("history") or {}
    return float(run["train_seconds"]) + float(sum(fine_tuning.get("epoch_seconds", [])))


def images_seen(run: dict[str, Any]) -> int:
    """The training images a run's training went through, repeats counted (a hard-image recipe's epochs are
    shorter than the training split; runs from before it was recorded saw all of it every epoch)."""
    compute = run.get("compute") or {}
    return int(compute.get("images_seen") or run["train_images"] * run["epochs_run"])


def training_tflops(run: dict[str, Any]) -> float:
    """A run's training compute in TFLOP: multiply-adds x 6 x training images seen, with its quantisation-aware
    fine-tuning's and its teacher's, if any."""
    own = run["compute"]["flops"] if run.get("compute") else 6 * run["multiply_adds"] * images_seen(run)
    fine_tuning = (run.get("quantisation_aware") or {}).get("tflops") or 0.0
    # A distilled run also cost its teacher's training and predictions.
    return own / 1e12 + fine_tuning + ((run.get("teacher") or {}).get("tflops") or 0.0)


def ablation_rows(results: list[dict[str, Any]], base: str, ablations: list[Recipe]) -> list[dict[str, Any]]:
    """The base recipe, each ablation (one ingredient changed) and the base with TTA toggled, on shared seeds."""
    ablated = {recipe.name for recipe in ablations}
    seeds = {r["seed"] for r in results if r["recipe"]["name"] in ablated}
    base_runs = [r for r in results if r["recipe"]["name"] == base and r["seed"] in seeds]
    if not base_runs:
        return []

    def row(name: str, change: str, runs: list[dict[str, Any]], which: str = "test") -> dict[str, Any]:
        accuracy, _ = _mean_std([run[which]["accuracy"] for run in runs])
        loss, _ = _mean_std([run[which]["loss"] for run in runs])
        return {"model": name, "change": change, "seeds": len(runs), "test_accuracy": accuracy, "test_loss": loss}

    rows = [row(base, "none (the full recipe)", base_runs)]
    toggled = "test_without_tta" if base_runs[0]["recipe"]["tta"] else "test_with_tta"
    rows.append(row(base, "TTA removed" if toggled == "test_without_tta" else "TTA added", base_runs, toggled))
    # Fields added since the base ran are missing from its file: they held their defaults.
    base_recipe = {**Recipe(name=base).as_dict(), **base_runs[0]["recipe"]}
    for recipe in ablations:
        runs = [r for r in results if r["recipe"]["name"] == recipe.name]
        if runs:
            changed = {k: v for k, v in recipe.as_dict().items() if k != "name" and base_recipe.get(k) != v}
            rows.append(row(recipe.name, ", ".join(f"{k}={v}" for k, v in changed.items()), runs))
    for entry in rows:
        entry["accuracy_change"] = entry["test_accuracy"] - rows[0]["test_accuracy"]
        entry["loss_change"] = entry["test_loss"] - rows[0]["test_loss"]
    return rows


def recipe_table(recipes: list[Recipe]):
    """The recipes side by side, one row each."""
    import pandas as pd

    return pd.DataFrame([recipe.as_dict() for recipe in recipes]).set_index("name")


def results_table(rows: list[dict[str, Any]]):
    import pandas as pd

    if not rows:
        return pd.DataFrame()
    frame = pd.DataFrame(rows).set_index("recipe")
    # Summaries written before these columns existed (issue 13) lack them.
    for column in ("training_tflops_mean", "achieved_gflops_mean", "precision"):
        if column not in frame:
            frame[column] = None
    if "passes_mean" not in frame:  # Before hard-image selection, every epoch was one pass.
        frame["passes_mean"] = frame["epochs_run_mean"]

    def plus_minus(mean: str, std: str) -> list[str]:
        # No-break spaces keep "0.9311 ± 0.0009" on one line in a narrow table column.
        return [f"{m:.4f}\u00a0±\u00a0{s:.4f}" for m, s in zip(frame[mean], frame[std], strict=True)]

    return pd.DataFrame(
        {
            "architecture": frame["architecture"],
            "seeds": frame["seeds"],
            "test accuracy": plus_minus("test_accuracy_mean", "test_accuracy_std"),
            "test loss": plus_minus("test_loss_mean", "test_loss_std"),
            # Which views the "with TTA" column averages, whether or not the recipe's test figures use them.
            "TTA": [
                tta_label(shifts) if tta else f"no ({tta_label(shifts)} measured)"
                for tta, shifts in zip(frame["tta"], frame.get("tta_shifts", [0] * len(frame)), strict=True)
            ],
            "accuracy without / with TTA": [
                f"{a:.4f}\u00a0/\u00a0{b:.4f}"
                for a, b in zip(
                    frame["test_accuracy_without_tta_mean"], frame["test_accuracy_with_tta_mean"], strict=True
                )
            ],
            "TTA gain on validation (points)": [
                "n/a" if pd.isna(gain) else f"{100 * gain:+.2f}" for gain in frame["validation_tta_gain_mean"]
            ],
            "ECE": frame["ece_mean"].round(4),
            "parameters": frame["parameters"].map("{:,}".format),
            "multiply-adds (M)": (frame["multiply_adds"] / 1e6).round(2),
            "epochs": frame["epochs_run_mean"].round(1),
            "images seen (passes)": frame["passes_mean"].round(1),
            "training (TFLOP)": frame["training_tflops_mean"].astype(float).round(1),
            "training (s)": frame["train_seconds_mean"].round(0),
            "achieved GFLOP/s": frame["achieved_gflops_mean"].astype(float).round(0),
            "precision": frame["precision"].map(lambda value: ", ".join(value) if value else "float32"),
            "LiteRT float32 p50 (ms)": frame["litert_float32_p50_ms"].astype(float).round(3),
            "LiteRT int8 p50 (ms)": frame["litert_int8_p50_ms"].astype(float).round(3),
            "int8 size (KB)": frame["litert_int8_kb"].astype(float).round(1),
        }
    )


# The recipes the comparison names, by role (the 06_experiments parameters of the same names).
ROLE_LABELS = {"baseline": "our baseline", "study": "the study's recipe", "strong": "our stronger model"}


def comparison_rows(rows: list[dict[str, Any]], *, baseline: str, strong: str, study: str = "") -> list[dict[str, Any]]:
    """The seed's claims, our named recipes (the study's own when ``study`` names one) and the published anchors."""
    from fmnist.config import BENCHMARK_URL, PUBLISHED_ANCHORS, SEED_CLAIMS

    by_name = {row["recipe"]: row for row in rows}
    table = [
        {
            "model": "the seed document's claim",
            "source": "seed.md",
            "parameters": 206_026,
            "test_accuracy": SEED_CLAIMS["test_accuracy"],
            "test_loss": SEED_CLAIMS["test_loss"],
        }
    ]
    names = {"baseline": baseline, "study": study, "strong": strong}
    for role, label in ROLE_LABELS.items():
        row = by_name.get(names[role])
        if row:
            table.append(
                {
                    "model": f"{label}: {names[role]} (mean of {row['seeds']} seeds)",
                    "source": "this study",
                    "parameters": row["parameters"],
                    "test_accuracy": row["test_accuracy_mean"],
                    "test_loss": row["test_loss_mean"],
                }
            )
    table += [{**anchor, "source": f"published ({BENCHMARK_URL})", "test_loss": None} for anchor in PUBLISHED_ANCHORS]
    return table


def comparison_table(comparison: list[dict[str, Any]]):
    """``comparison_rows`` as a table: accuracy and loss to 4 decimals, parameters with separators."""
    import pandas as pd

    frame = pd.DataFrame(comparison).set_index("model")
    frame["parameters"] = [f"{v:,.0f}" if isinstance(v, int | float) and v == v else "" for v in frame["parameters"]]
    frame["test_accuracy"] = frame["test_accuracy"].round(4)
    frame["test_loss"] = [f"{v:.4f}" if v is not None and v == v else "" for v in frame["test_loss"]]
    # The long benchmark address is given once, in the text above the table.
    frame["source"] = [source.split(" (")[0] for source in frame["source"]]
    return frame[["test_accuracy", "test_loss", "parameters", "source"]]


def ablation_table(rows: list[dict[str, Any]]):
    import pandas as pd

    if not rows:
        return pd.DataFrame()
    frame = pd.DataFrame(rows)
    frame["accuracy change (points)"] = (100 * frame.pop("accuracy_change")).round(2)
    frame["loss change"] = frame.pop("loss_change").round(4)
    frame[["test_accuracy", "test_loss"]] = frame[["test_accuracy", "test_loss"]].round(4)
    return frame.set_index(["model", "change"])


def reliability_curves(results: list[dict[str, Any]], names: list[str]) -> dict[str, dict[str, Any]]:
    """Each named recipe's reliability bins and ECE, from its first seed's run."""
    curves = {}
    for name in names:
        run = next((r for r in results if r["recipe"]["name"] == name), None)
        if run is not None:
            curves[name] = {"ece": run["test"]["ece"], "bins": run["test"]["reliability"], "seed": run["seed"]}
    return curves


def contradiction(rows: list[dict[str, Any]], *, stated: str, tuned: str) -> dict[str, Any] | None:
    """The seed's stated training recipe against the tuned one, on the same architecture and seeds."""
    by_name = {row["recipe"]: row for row in rows}
    if stated not in by_name or tuned not in by_name:
        return None
    a, b = by_name[stated], by_name[tuned]
    return {
        "stated": stated,
        "tuned": tuned,
        "stated_accuracy": a["test_accuracy_mean"],
        "stated_accuracy_std": a["test_accuracy_std"],
        "tuned_accuracy": b["test_accuracy_mean"],
        "tuned_accuracy_std": b["test_accuracy_std"],
        "stated_loss": a["test_loss_mean"],
        "tuned_loss": b["test_loss_mean"],
        "accuracy_difference": b["test_accuracy_mean"] - a["test_accuracy_mean"],
    }


# The seed's "best hyperparameters", as a point of the grid.
SEED_POINT = {"learning_rate": 1e-3, "batch_size": 64, "dropout_rate": 0.5}
GRID_FIELDS = tuple(SEED_POINT)


def budget_comparison(cheap, full, objective: str = "val_loss") -> dict[str, Any]:
    """What the cheap search saw against the seed's own budget, on the points both trained.

    ``cheap`` and ``full`` are trial tables (fmnist.tuning.trial_table). Ranks
    are 1 for the best; Spearman's rho compares the two rankings.
    """
    from scipy.stats import spearmanr

    ascending = objective == "val_loss"
    keys = list(GRID_FIELDS)
    merged = cheap[[*keys, objective]].merge(
        full[[*keys, objective, "best_epoch", "val_accuracy"]], on=keys, suffixes=("_cheap", "_full")
    )
    if len(merged) < 3:
        raise ValueError(f"only {len(merged)} grid points in both searches; a ranking needs at least 3.")
    merged["rank_cheap"] = merged[f"{objective}_cheap"].rank(ascending=ascending, method="min").astype(int)
    merged["rank_full"] = merged[f"{objective}_full"].rank(ascending=ascending, method="min").astype(int)
    merged = merged.sort_values("rank_full").reset_index(drop=True)
    rho, p_value = spearmanr(merged["rank_cheap"], merged["rank_full"])

    def point(row) -> dict[str, Any]:
        return {
            **{key: type(SEED_POINT[key])(row[key]) for key in keys},
            "rank_cheap": int(row["rank_cheap"]),
            "rank_full": int(row["rank_full"]),
            f"{objective}_cheap": float(row[f"{objective}_cheap"]),
            f"{objective}_full": float(row[f"{objective}_full"]),
            "val_accuracy_full": float(row["val_accuracy"]),
            "best_epoch_full": int(row["best_epoch"]),
        }

    seed_rows = merged[np.all([np.isclose(merged[key], value) for key, value in SEED_POINT.items()], axis=0)]
    cheap_winner = merged.loc[merged["rank_cheap"].idxmin()]
    top = 5
    overlap = len(set(merged.nsmallest(top, "rank_cheap").index) & set(merged.nsmallest(top, "rank_full").index))
    return {
        "objective": objective,
        "points": len(merged),
        "full_winner": point(merged.iloc[0]),
        "cheap_winner": point(cheap_winner),
        "seed_point": point(seed_rows.iloc[0]) if len(seed_rows) else None,
        "spearman_rho": float(rho),
        "spearman_p": float(p_value),
        "top5_overlap": overlap,
        "table": [point(row) for _, row in merged.iterrows()],
    }
