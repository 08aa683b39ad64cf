"""Every figure of the study. Each function returns a matplotlib Figure; ``save_figure`` stores it."""

from __future__ import annotations

import os

import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns

from fmnist.config import CLASS_NAMES
from fmnist.io import atomic_path

sns.set_theme(style="whitegrid", context="notebook")


def save_figure(figure: plt.Figure, path: os.PathLike[str] | str) -> None:
    """Save as PNG, atomically."""
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=110, bbox_inches="tight")


def class_balance(counts: dict[str, dict[str, int]]) -> plt.Figure:
    """Bar chart of examples per class, one bar group per split."""
    import pandas as pd

    frame = (
        pd.DataFrame(counts)
        .rename_axis("class")
        .reset_index()
        .melt(id_vars="class", var_name="split", value_name="images")
    )
    figure, axis = plt.subplots(figsize=(10, 3.5))
    sns.barplot(frame, x="class", y="images", hue="split", ax=axis)
    axis.set_title("Images per class")
    axis.tick_params(axis="x", rotation=30)
    sns.move_legend(axis, "upper left", bbox_to_anchor=(1.01, 1), title="split")
    return figure


def image_grid(images: np.ndarray, titles: list[str], columns: int, title: str) -> plt.Figure:
    """A grid of grey images with a caption under each."""
    rows = max(1, int(np.ceil(len(images) / columns)))
    figure, axes = plt.subplots(rows, columns, figsize=(columns * 1.25, rows * 1.45), squeeze=False)
    for index, axis in enumerate(axes.flat):
        axis.axis("off")
        if index < len(images):
            axis.imshow(np.squeeze(images[index]), cmap="gray_r", vmin=0, vmax=1)
            axis.set_title(titles[index], fontsize=7)
    figure.suptitle(title)
    figure.tight_layout()
    return figure


def sample_grid(images: np.ndarray, labels: np.ndarray, per_class: int, seed: int) -> plt.Figure:
    """``per_class`` random examples of each class, one row per class."""
    rng = np.random.default_rng(seed)
    chosen = [
        rng.choice(np.flatnonzero(labels == label), per_class, replace=False) for label in range(len(CLASS_NAMES))
    ]
    order = np.concatenate(chosen)
    titles = [CLASS_NAMES[labels[i]] for i in order]
    return image_grid(images[order], titles, columns=per_class, title="Random training examples, one row per class")


def mean_images(means: np.ndarray) -> plt.Figure:
    figure, axes = plt.subplots(1, len(CLASS_NAMES), figsize=(15, 2))
    for axis, image, name in zip(axes, means, CLASS_NAMES, strict=False):
        axis.imshow(image, cmap="magma", vmin=0, vmax=1)
        axis.set_title(name, fontsize=9)
        axis.axis("off")
    figure.suptitle("Mean image per class (training set)")
    return figure


def intensity_distribution(images: np.ndarray, labels: np.ndarray, statistics: dict[str, dict]) -> plt.Figure:
    """Histogram of non-zero pixel intensities per class, and the share of black pixels.

    ``statistics`` is ``eda.intensity_statistics`` of the same images (its ``black_fraction``).
    """
    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 4), gridspec_kw={"width_ratios": [2, 1]})
    bins = np.linspace(0, 1, 52)
    for label, name in enumerate(CLASS_NAMES):
        pixels = images[labels == label].ravel()
        left.hist(pixels[pixels > 0], bins=bins, histtype="step", density=True, label=name, linewidth=1.2)
    left.set_xlabel("pixel intensity (non-zero pixels)")
    left.set_ylabel("density")
    left.set_title("Ink intensity per class")
    left.legend(fontsize=7, ncol=2)
    black = [statistics[name]["black_fraction"] for name in CLASS_NAMES]
    sns.barplot(x=black, y=list(CLASS_NAMES), ax=right, color="slategray")
    right.set_xlabel("fraction of pixels that are exactly 0")
    right.set_title("Background share per class")
    figure.tight_layout()
    return figure


def tuning_trials(trials, metric: str = "val_loss") -> plt.Figure:
    """The best validation loss (or accuracy) each configuration reached: learning rate by (batch size, dropout).

    Blank cells are configurations the tuner never tried (Hyperband samples the grid).
    """
    lower_is_better = metric.endswith("loss")
    table = trials.pivot_table(
        index="learning_rate",
        columns=["batch_size", "dropout_rate"],
        values=metric,
        aggfunc="min" if lower_is_better else "max",
    ).sort_index(ascending=False)
    figure, axis = plt.subplots(figsize=(max(6, 1.1 * table.shape[1] + 2), 1.0 * table.shape[0] + 1.8))
    label = metric.replace("val_", "validation ")
    sns.heatmap(
        table,
        annot=True,
        fmt=".3f",
        cmap="viridis_r" if lower_is_better else "viridis",
        cbar_kws={"label": label},
        ax=axis,
    )
    axis.set_xlabel("batch size - dropout")
    axis.set_ylabel("learning rate")
    axis.set_title(f"Tuning: best {label} of each configuration")
    return figure


def learning_curves(history: dict[str, list[float]], best_epoch: int | None = None) -> plt.Figure:
    figure, axes = plt.subplots(1, 2, figsize=(12, 4))
    epochs = np.arange(1, len(history["loss"]) + 1)
    for axis, metric in zip(axes, ("loss", "accuracy"), strict=False):
        axis.plot(epochs, history[metric], "o-", label=f"training {metric}")
        axis.plot(epochs, history[f"val_{metric}"], "o-", label=f"validation {metric}")
        if best_epoch:
            axis.axvline(best_epoch, color="grey", linestyle="--", label="restored epoch")
        axis.set_xlabel("epoch")
        axis.set_title(metric.capitalize())
        axis.legend()
    figure.tight_layout()
    return figure


def confusion_matrix(matrix: np.ndarray) -> plt.Figure:
    figure, axis = plt.subplots(figsize=(8.5, 7))
    sns.heatmap(
        matrix,
        annot=True,
        fmt="d",
        cmap="Blues",
        xticklabels=CLASS_NAMES,
        yticklabels=CLASS_NAMES,
        cbar=False,
        ax=axis,
        annot_kws={"fontsize": 8},
    )
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    axis.tick_params(axis="x", rotation=45)
    axis.set_title("Confusion matrix (test set)")
    return figure


def per_class_metrics(per_class: dict[str, dict[str, float]]) -> plt.Figure:
    import pandas as pd

    frame = (
        pd.DataFrame(per_class)
        .T[["precision", "recall", "f1"]]
        .rename_axis("class")
        .reset_index()
        .melt(id_vars="class", var_name="metric")
    )
    figure, axis = plt.subplots(figsize=(10, 3.8))
    sns.barplot(frame, x="class", y="value", hue="metric", ax=axis)
    axis.set_ylim(max(0.0, frame["value"].min() - 0.1), 1.0)
    axis.set_title("Per-class precision, recall and F1 (test set)")
    axis.tick_params(axis="x", rotation=30)
    sns.move_legend(axis, "upper left", bbox_to_anchor=(1.01, 1), title=None)
    return figure


def deployment(bench: dict) -> plt.Figure:
    """Single-image latency (log scale) and size on disk of each deployed form of the model."""
    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 3.8), gridspec_kw={"width_ratios": [3, 2]})
    names = list(bench["latency"])
    p50 = [bench["latency"][name]["p50_ms"] for name in names]
    p99 = [bench["latency"][name]["p99_ms"] for name in names]
    positions = np.arange(len(names))
    left.barh(positions + 0.2, p50, height=0.4, label="p50", color="#3a6ff7")
    left.barh(positions - 0.2, p99, height=0.4, label="p99", color="#9aa3b5")
    left.set_yticks(positions, [name.replace("_", " ") for name in names])
    left.set_xscale("log")
    left.set_xlabel("milliseconds per image, one thread (log scale)")
    left.set_title("Single-image latency")
    left.legend()
    sizes = bench["sizes_bytes"]
    sns.barplot(
        x=[size / 1024 for size in sizes.values()], y=[n.replace("_", " ") for n in sizes], ax=right, color="slategray"
    )
    right.set_xlabel("KB on disk")
    right.set_title("Model size")
    figure.tight_layout()
    return figure


def misclassified_gallery(images, true_labels, predicted_labels, confidences, columns: int = 8) -> plt.Figure:
    titles = [
        f"{CLASS_NAMES[t]}\n→ {CLASS_NAMES[p]} ({c:.0%})"
        for t, p, c in zip(true_labels, predicted_labels, confidences, strict=False)
    ]
    return image_grid(
        images,
        titles,
        columns=columns,
        title="Misclassified test images, most confident mistakes first (true → predicted)",
    )


def reliability(curves: dict[str, dict]) -> plt.Figure:
    """Reliability diagram: accuracy against confidence per bin, one line per model (diagonal = calibrated)."""
    figure, axis = plt.subplots(figsize=(5.5, 5))
    axis.plot([0, 1], [0, 1], linestyle="--", color="gray", label="perfectly calibrated")
    for name, calibration in curves.items():
        bins = calibration["bins"]
        axis.plot(
            [b["confidence"] for b in bins],
            [b["accuracy"] for b in bins],
            marker="o",
            label=f"{name}, seed {calibration['seed']} (ECE {calibration['ece']:.3f})"
            if "seed" in calibration
            else f"{name} (ECE {calibration['ece']:.3f})",
        )
    axis.set_xlabel("confidence of the top class")
    axis.set_ylabel("accuracy")
    axis.set_xlim(0, 1.01)
    axis.set_ylim(0, 1.01)
    axis.set_title("Reliability on the test set (one seed per model)")
    axis.legend(loc="upper left", fontsize="small")
    figure.tight_layout()
    return figure


# Markers cycled with the colours, so recipes stay apart beyond the palette's colours and in greyscale.
RECIPE_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h")


def recipe_styles(names: list[str]) -> dict[str, dict[str, str]]:
    """A distinct colour and marker per recipe (``names`` in table order), the same in every figure."""
    palette = sns.color_palette("tab20", 20)
    # Even entries first: tab20 pairs a strong and a light shade of each hue.
    colours = palette[0::2] + palette[1::2]
    return {
        name: {"color": colours[index % len(colours)], "marker": RECIPE_MARKERS[index % len(RECIPE_MARKERS)]}
        for index, name in enumerate(names)
    }


EARLIER_MACHINE = "an earlier run's machine"


def accuracy_vs_latency(rows: list[dict]) -> plt.Figure:
    """Mean test accuracy (± one standard deviation over seeds) against LiteRT int8 single-image latency.

    Latencies compare only within one machine: the figure shows the recipes timed on the machine that timed
    most of them (figures kept from earlier runs, whose models are not on disk, are left out when any were
    timed anew) and says how many it left out.
    """
    styles = recipe_styles([row["recipe"] for row in rows])
    timed = [row for row in rows if row.get("litert_int8_p50_ms") is not None]
    by_machine: dict[str, list[dict]] = {}
    for row in timed:
        by_machine.setdefault(row.get("latency_machine") or EARLIER_MACHINE, []).append(row)
    recent = {machine: group for machine, group in by_machine.items() if machine != EARLIER_MACHINE} or by_machine
    machine = max(recent, key=lambda name: len(recent[name])) if recent else None
    shown = recent.get(machine, [])
    figure, axis = plt.subplots(figsize=(8, 4.8))
    for row in shown:
        mean, std = row["test_accuracy_mean"], row["test_accuracy_std"]
        axis.errorbar(
            row["litert_int8_p50_ms"], mean, yerr=std, capsize=4, label=row["recipe"], **styles[row["recipe"]]
        )
    axis.set_xscale("log")
    axis.xaxis.set_major_locator(plt.matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 3.0, 5.0)))
    axis.xaxis.set_major_formatter(plt.matplotlib.ticker.FormatStrFormatter("%g"))
    axis.xaxis.set_minor_formatter(plt.matplotlib.ticker.NullFormatter())
    axis.set_xlabel("LiteRT int8 latency per image, p50, one thread (ms, log scale)")
    axis.set_ylabel("test accuracy (mean ± std over seeds)")
    # The machine's name without its ISA flags keeps the title on one line; the table has the full name.
    axis.set_title(
        f"Accuracy against latency, timed on {machine.split(' (')[0]}" if machine else "Accuracy against latency"
    )
    left_out = len(timed) - len(shown)
    if left_out:
        axis.annotate(
            f"{left_out} recipe{'s' if left_out > 1 else ''} timed on another machine left out (see the table)",
            (0.0, 0.0),
            xycoords="axes fraction",
            xytext=(4, 4),
            textcoords="offset points",
            fontsize="x-small",
            color="dimgrey",
        )
    if shown:
        axis.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    figure.tight_layout()
    return figure


def accuracy_vs_compute(rows: list[dict], anchors, budgets: dict[str, float]) -> plt.Figure:
    """Mean test accuracy (± one standard deviation over seeds) against training compute, with the
    published results (whose compute is not published) as horizontal lines and the budgets as vertical ones."""
    styles = recipe_styles([row["recipe"] for row in rows])
    figure, axis = plt.subplots(figsize=(10, 5))
    for row in rows:
        axis.errorbar(
            row["training_tflops_mean"],
            row["test_accuracy_mean"],
            yerr=row["test_accuracy_std"],
            capsize=4,
            label=f"{row['recipe']} ({row['seeds']} seed{'s' if row['seeds'] > 1 else ''})",
            **styles[row["recipe"]],
        )
    # Published results within 0.45 points of each other share one line and one label.
    groups: list[list[dict]] = []
    for anchor in sorted(anchors, key=lambda anchor: anchor["test_accuracy"]):
        if groups and anchor["test_accuracy"] - groups[-1][0]["test_accuracy"] < 0.0045:
            groups[-1].append(anchor)
        else:
            groups.append([anchor])
    for group in groups:
        level = group[0]["test_accuracy"]
        axis.axhline(level, color="grey", linewidth=0.6, linestyle=":")
        best = max(group, key=lambda anchor: anchor["test_accuracy"])
        text = f"{best['model']} {best['test_accuracy']:.3f}"
        if len(group) > 1:
            # One name per group keeps the label inside the axes (the line is at the group's lowest result);
            # the report's table lists them all.
            text += f" (and {len(group) - 1} more from {level:.3f})"
        axis.annotate(
            text,
            (0.0, level),
            xycoords=("axes fraction", "data"),
            xytext=(4, 2),
            textcoords="offset points",
            fontsize="x-small",
            color="dimgrey",
        )
    if groups:
        # Room above the highest published line for its label.
        axis.set_ylim(top=max(axis.get_ylim()[1], groups[-1][0]["test_accuracy"] + 0.008))
    for label, tflops in budgets.items():
        axis.axvline(tflops, color="black", linewidth=0.8, linestyle="--")
        axis.annotate(
            label,
            (tflops, 0.0),
            xycoords=("data", "axes fraction"),
            xytext=(3, 4),
            textcoords="offset points",
            fontsize="x-small",
            rotation=90,
        )
    axis.set_xscale("log")
    axis.xaxis.set_major_formatter(plt.matplotlib.ticker.FormatStrFormatter("%g"))
    axis.set_xlabel("training compute per seed (TFLOP = multiply-adds x 6 x images seen, log scale)")
    axis.set_ylabel("test accuracy (mean ± std over seeds)")
    axis.set_title("Accuracy against training compute (comparable across machines)")
    axis.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    figure.tight_layout()
    return figure


def ablation(rows: list[dict]) -> plt.Figure:
    """Change in test accuracy, in points, when one ingredient of the full recipe is changed."""
    changed = rows[1:]
    figure, axis = plt.subplots(figsize=(7, 0.5 + 0.5 * len(changed)))
    values = [100 * row["accuracy_change"] for row in changed]
    labels = [row["change"] if row["model"] == rows[0]["model"] else row["model"] for row in changed]
    axis.barh(labels, values, color=["#c0392b" if v < 0 else "#27ae60" for v in values])
    axis.axvline(0, color="black", linewidth=0.8)
    axis.set_xlabel(f"test accuracy change vs {rows[0]['model']} (points)")
    runs = rows[0]["seeds"]
    axis.set_title(f"Ablation: what each ingredient adds ({runs} seed{'s' if runs != 1 else ''} per row)")
    figure.tight_layout()
    return figure


def budget_ranking(comparison: dict) -> plt.Figure:
    """Each grid point's validation loss after the cheap budget against the seed's full budget."""
    objective = comparison["objective"]
    table = comparison["table"]
    figure, axis = plt.subplots(figsize=(7, 5))
    cheap = [row[f"{objective}_cheap"] for row in table]
    full = [row[f"{objective}_full"] for row in table]
    colours = [row["learning_rate"] for row in table]
    scatter = axis.scatter(cheap, full, c=np.log10(colours), cmap="viridis", s=50, edgecolor="black", linewidth=0.5)
    figure.colorbar(scatter, ax=axis, label="log10 learning rate")
    marked = [
        ("full-budget winner", comparison["full_winner"], "red"),
        ("cheap winner", comparison["cheap_winner"], "orange"),
    ]
    if comparison.get("seed_point"):
        marked.append(("the seed's choice", comparison["seed_point"], "magenta"))
    for label, row, colour in marked:
        axis.scatter(
            row[f"{objective}_cheap"],
            row[f"{objective}_full"],
            s=220,
            facecolor="none",
            edgecolor=colour,
            linewidth=2,
            label=label,
        )
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.set_xlabel(f"{objective}, cheap budget (02_tune)")
    axis.set_ylabel(f"{objective}, the seed's budget (10 epochs, 54,000 images)")
    axis.set_title(f"Same grid, two budgets: Spearman rho = {comparison['spearman_rho']:.2f}")
    axis.legend(loc="upper left")
    figure.tight_layout()
    return figure
