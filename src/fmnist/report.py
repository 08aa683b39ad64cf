"""The HTML report: tables for the report notebook, and its rendering with nbconvert."""

from __future__ import annotations

import html
import math
import re
from pathlib import Path
from typing import Any

import pandas as pd

from fmnist.config import (
    ALL_STAGES,
    BENCHMARK_URL,
    OPTIONAL_STAGES,
    PACKAGE_DIR,
    REPORT_NOTEBOOK,
    STAGES,
    ArtifactLayout,
)
from fmnist.io import read_json, write_text
from fmnist.manifest import describe_machine
from fmnist.results import ROLE_LABELS
from fmnist.run_index import duration, stage_seconds, study_seconds

# The reference study's params profile; any other (params/smoke, a copy) is said to be one in the banner.
REFERENCE_PROFILE = "params"
UPPER_BODY = {"T-shirt/top", "Pullover", "Coat", "Shirt", "Dress"}

# Which stage writes which figure, so a missing one says what to run.
FIGURE_STAGES = {
    "class_balance": "01_eda",
    "sample_grid": "01_eda",
    "mean_images": "01_eda",
    "intensity_distribution": "01_eda",
    "tuning_trials": "02_tune",
    "budget_ranking": "02_tune",
    "learning_curves": "03_train",
    "confusion_matrix": "04_evaluate",
    "per_class_metrics": "04_evaluate",
    "misclassified": "04_evaluate",
    "deployment": "05_deploy",
    "experiments_accuracy_latency": "06_experiments",
    "experiments_accuracy_compute": "06_experiments",
    "experiments_ablation": "06_experiments",
    "experiments_reliability": "06_experiments",
}


def load_optional(path: Path) -> Any | None:
    return read_json(path) if path.is_file() else None


def show_figure(layout: ArtifactLayout, name: str):
    """The stored PNG as an embeddable image, or a note saying which stage makes it."""
    from IPython.display import Image, Markdown

    path = layout.figure(name)
    if path.is_file():
        return Image(filename=str(path))
    return Markdown(f"*Figure `{name}` is missing: run stage `{FIGURE_STAGES.get(name, '?')}`.*")


def title_block(metrics: dict | None, training: dict | None) -> str:
    """The report's title and a one-paragraph answer: how good is the model, against the seed."""
    lines = ["# Fashion-MNIST with the seed's CNN: study report", ""]
    if metrics:
        accuracy, loss = metrics["test_accuracy"], metrics["test_loss"]
        lines.append(
            f"**Test accuracy {accuracy:.4f}, test loss {loss:.4f}** on the 10,000 test images "
            f"(the seed document claims 0.90 and 0.30)."
        )
    else:
        lines.append("*No evaluation yet: run stage `04_evaluate`.*")
    if training:
        recipe = training["recipe"]
        lines.append(
            f"The seed's architecture ({training['parameters']:,} parameters), trained for "
            f"{plural(training['epochs_run'], 'epoch')} (weights from epoch {training['best_epoch']}) with Adam at "
            f"learning rate {recipe['learning_rate']:g}, batch size {recipe['batch_size']} and dropout "
            f"{recipe['dropout_rate']:g}, the values of the {training['hyperparameter_source']}."
        )
    return "\n".join(lines)


def stored_training_seconds(summary: dict | None) -> tuple[float, int]:
    """The training time of every stored experiment run (whichever run trained it), and how many runs."""
    if not summary:
        return 0.0, 0
    rows = summary.get("recipes", [])
    seconds = sum((row.get("train_seconds_mean") or 0.0) * row.get("seeds", 0) for row in rows)
    return seconds, sum(row.get("seeds", 0) for row in rows)


def banner_block(manifest: dict, experiments_summary: dict | None = None) -> str:
    """What a reader needs before any figure: which run, profile, machine and time this report shows.

    A run of any profile but the reference one, or one missing study stages, says so here, first.
    """
    stages = manifest.get("stages", {})
    profile = manifest.get("params_profile") or "?"
    git = manifest.get("git", {})
    commit = str(git.get("commit") or "?")[:10] + (" (with uncommitted changes)" if git.get("dirty") else "")
    machine = describe_machine(manifest.get("machine") or {"cpu": manifest.get("processor", "?")})
    lines = []
    if not manifest.get("params_profile"):
        lines += [
            "> **⚠ Not the reference study: these notebooks were run by hand** (their defaults are cheap, and no "
            "`fmnist run` manifest records a profile); `fmnist run --params params` makes the reference.",
            ">",
        ]
    elif profile != REFERENCE_PROFILE:
        lines += [
            f"> **⚠ Not the reference study: this is a run of the `{profile}` profile.** Its parameters are not "
            f"the reference's (a smoke profile only checks that the chain works), so its figures do not compare "
            f"with the seed's or the reference run's; `fmnist run --params {REFERENCE_PROFILE}` makes that.",
            ">",
        ]
    missing = [stage for stage in STAGES if stage not in stages]
    if missing:
        lines += [
            f"> **⚠ Partial run: {', '.join(missing)} did not run.** Sections with nothing to show are left out; "
            "run the missing stages to fill them.",
            ">",
        ]
    study = [stage for stage in STAGES if stage in stages]
    profile_note = " (the reference study)" if profile == REFERENCE_PROFILE else ""
    lines += [
        f"> **Run** `{manifest.get('run_id', '?')}` · **profile** `{profile}`{profile_note} · **commit** `{commit}`",
        ">",
        f"> **Machine:** {machine}",
        ">",
    ]
    if study:
        span = study[0] if len(study) == 1 else f"{study[0]} to {study[-1]}"
        timing = f"> **Time:** the study ({span}) took **{duration(study_seconds(stages) or 0.0)}**"
    else:
        timing = "> **Time:** no study stage ran"
    extra = [stage for stage in OPTIONAL_STAGES if stage in stages]
    for stage in extra:
        timing += f"; {stage} took {duration(stage_seconds(stages[stage]) or 0.0)} in this run"
        if stage == "06_experiments":
            stored, count = stored_training_seconds(experiments_summary)
            if count:
                timing += (
                    f"; the {count} stored runs of its compared recipes took {duration(stored)} of training when "
                    "they were made (a kept run is not retrained, and some ran on other machines)"
                )
    lines.append(timing + ".")
    return "\n".join(lines)


def training_block(training: dict | None) -> str:
    if not training:
        return "*No training summary: run stage `03_train`.*"
    recipe = training["recipe"]
    resumed = (
        f" (resumed at epoch {training['resumed_at_epoch'] + 1} after an interruption)"
        if training.get("resumed_at_epoch")
        else ""
    )
    return (
        f"- Hyperparameters: learning rate **{recipe['learning_rate']:g}**, batch size **{recipe['batch_size']}**, "
        f"dropout **{recipe['dropout_rate']:g}**, from the {training['hyperparameter_source']}.\n"
        "- The seed contradicts itself: its tuning picks learning rate 1e-3 / batch 64 while its training section "
        "says 0.01 / batch 32. This study trains with the tuned values.\n"
        f"- {plural(training['epochs_run'], 'epoch')} run on {training['train_images']:,} images in "
        f"{training['train_seconds']:.0f} s{resumed}; early stopping (validation loss) kept epoch "
        f"**{training['best_epoch']}** (validation accuracy {training['validation']['accuracy']:.4f}, "
        f"loss {training['validation']['loss']:.4f})." + compute_line(training)
    )


def compute_line(training: dict) -> str:
    """The training's compute and precision, when recorded (runs before issue 13 lack them)."""
    compute = training.get("compute")
    if not compute:
        return ""
    precision = training.get("precision", "float32")
    mode = "bfloat16 mixed precision (this CPU computes bf16 natively)" if precision == "bfloat16" else "float32"
    rate = (
        f" at {compute['achieved_gflops']:.0f} GFLOP/s, {100 * compute['fraction_of_peak']:.0f}% of this machine's "
        f"float32 matrix-multiply peak ({compute['peak_gflops']:.0f} GFLOP/s, all cores)"
        if compute.get("achieved_gflops")
        else ""
    )
    seen = compute.get("images_seen")
    passes = (
        f"; hard-image selection: {seen:,} images seen, {seen / training['train_images']:.1f} passes"
        if seen and training.get("hard_images")
        else ""
    )
    return f"\n- Trained in {mode}: {compute['tflops']:.1f} TFLOP (multiply-adds x 6 x images seen){passes}{rate}."


def trials_table(layout: ArtifactLayout) -> pd.DataFrame:
    if not layout.tuning_trials.is_file():
        return pd.DataFrame()
    trials = pd.read_csv(layout.tuning_trials).set_index("trial")
    trials["learning_rate"] = trials["learning_rate"].map("{:g}".format)
    return trials.round(4)


def _count_text(value) -> str:
    return f"{value:,}" if isinstance(value, int) else str(value or "")


def tuning_block(layout: ArtifactLayout, best: dict | None) -> str:
    if not best:
        return "*No tuning result: run stage `02_tune`; training then used the seed's selected values.*"
    manifest = load_optional(layout.stage_manifest("02_tune")) or {}
    p = manifest.get("parameters", {})
    epochs = f"up to {p.get('tuning_epochs')}" if p.get("tuner") == "hyperband" else f"{p.get('tuning_epochs')}"
    budget = (
        f"{p.get('tuner')} search, {manifest.get('trials', '?')} trials of {epochs} "
        f"epoch{'s' if epochs != '1' else ''} on {_count_text(p.get('train_subset')) or 'all'} training images, "
        f"ranked by {p.get('objective', 'val_loss')} "
        f"on the {_count_text(p.get('validation_size'))}-image validation split (never the test set)"
    )
    return (
        f"Search space of the seed: learning rate {{1e-3, 1e-4, 1e-5}} × batch size {{32, 64, 128}} × "
        f"dropout {{0.1, 0.3, 0.5}}; {budget}. Best: learning rate **{best['learning_rate']:g}**, batch size "
        f"**{best['batch_size']}**, dropout **{best['dropout_rate']:g}**."
    )


def _point(row: dict) -> str:
    return f"learning rate {row['learning_rate']:g}, batch {row['batch_size']}, dropout {row['dropout_rate']:g}"


def budget_block(comparison: dict | None) -> str:
    """Which point wins at the seed's own budget, where the seed's choice ranks, what the cheap budget sees."""
    if not comparison:
        return (
            "*Not compared: the seed's grid at its own budget has not been run and published "
            "(`make seed-budget`, hours; `full_budget_run` in params/02_tune.yaml names it).*"
        )
    full, cheap, seed = comparison["full_winner"], comparison["cheap_winner"], comparison.get("seed_point")
    points = comparison["points"]
    lines = [
        f"The same {points}-point grid trained at the seed's budget (up to 10 epochs, early stopping with "
        "patience 3, all 54,000 training images), ranked by validation loss:",
        "",
        f"- **Winner at the full budget:** {_point(full)}: validation loss {full['val_loss_full']:.4f}, "
        f"accuracy {full['val_accuracy_full']:.4f} (best epoch {full['best_epoch_full']}). "
        f"The cheap search ranked it {full['rank_cheap']} of {points}. **The study trains with it.**",
    ]
    if seed:
        lines.append(
            f"- **The seed's choice** ({_point(seed)}) ranks **{seed['rank_full']} of {points}** at its own "
            f"budget (validation loss {seed['val_loss_full']:.4f}) and {seed['rank_cheap']} on the cheap one."
        )
    lines += [
        f"- **The cheap winner** ({_point(cheap)}) ranks {cheap['rank_full']} of {points} at the full budget.",
        f"- **Agreement of the two rankings:** Spearman's rho = {comparison['spearman_rho']:.2f} "
        f"(p = {comparison['spearman_p']:.2g}); {comparison['top5_overlap']} of the 5 best points are shared.",
        "",
        "The cheap budget separates the learning rates (1e-5 barely moves in two short epochs) but cannot see "
        "what dropout and smaller batches buy once training runs long enough to over-fit; the full budget can.",
    ]
    return "\n".join(lines)


def _range_text(values) -> str:
    """'6,000' when all are equal, else '5,980–6,020'."""
    low, high = min(values), max(values)
    return f"{low:,}" if low == high else f"{low:,}–{high:,}"


def plural(count: int, noun: str) -> str:
    return f"{count:,} {noun}" + ("" if count == 1 else "s")


def data_block(summary: dict | None) -> str:
    if not summary:
        return "*No EDA summary: run stage `01_eda`.*"
    duplicates = summary["duplicates"]
    return (
        f"{summary['train_size']:,} training and {summary['test_size']:,} test images, 28×28 grey, ten classes "
        f"with {_range_text(summary['class_counts']['train'].values())} training images each. "
        f"Pixel mean {summary['pixel_mean']:.3f}, standard deviation "
        f"{summary['pixel_std']:.3f}. Exact duplicates: {duplicates['duplicate_groups']} groups, "
        f"{duplicates['groups_spanning_splits']} of them spanning train and test."
    )


def _http_figures(load: dict) -> str:
    return (
        f"{load['requests']:,} requests, round trip p50 **{load['p50_ms']:.2f} ms**, p99 {load['p99_ms']:.2f} ms, "
        f"**{load['errors']} errors**"
    )


def _served_model(serving: dict) -> str:
    """Which model a bench served, in words (bench files written before the file was recorded name the kind)."""
    if serving["model"] == "shipped":
        return f"the shipped classifier: `deploy/{serving['file']}`, {serving['size_bytes'] / 1024:.0f} KB"
    return f"the study's {serving['model']} model"


def deployment_tables(bench: dict | None) -> tuple[pd.DataFrame, str]:
    """Per-engine size, latency and throughput as a table; the serving process's figures as Markdown."""
    if not bench:
        return pd.DataFrame(), "*No benchmark figures: run stage `05_deploy` (or `fmnist bench`).*"
    rows = []
    for name, figures in bench["latency"].items():
        size_key = "keras" if name.startswith("keras") else name
        rows.append(
            {
                "engine": name.replace("_", " "),
                "size (KB)": bench["sizes_bytes"][size_key] / 1024,
                "p50 (ms)": figures["p50_ms"],
                "p99 (ms)": figures["p99_ms"],
                "speed-up vs predict": bench["speedup_vs_predict"][name],
                "batch throughput (images/s)": bench["throughput"][name],
            }
        )
    latency = pd.DataFrame(rows).set_index("engine").round({"size (KB)": 1, "p50 (ms)": 4, "p99 (ms)": 4})
    latency["speed-up vs predict"] = latency["speed-up vs predict"].map("{:,.0f}×".format)
    latency["batch throughput (images/s)"] = latency["batch throughput (images/s)"].map("{:,.0f}".format)
    serving = bench["serving"]
    load, closed, idle = serving["load"], serving["closed_loop"], serving["idle"]
    slow, hostile = serving["slow"], serving["hostile"]
    server_errors = hostile["server_errors"] + sum(
        1 for kind in load["error_kinds"] + closed["error_kinds"] if kind.startswith("HTTP 5")
    )
    serving_lines = [
        f"The serving process (`fmnist serve`, {_served_model(serving)}), measured on loopback with "
        f"{serving['request_image']} requests (`fmnist bench`, phases in this order):",
        "",
        f"- cold start to first answer: **{serving['cold_start_to_first_answer_s']:.2f} s**",
        f"- idle, one request at a time: round trip p50 **{idle['p50_ms']:.2f} ms**, p99 {idle['p99_ms']:.2f} ms",
        f"- {hostile['clients']} clients at once sending hostile uploads (a 16-bit PNG claiming 6300×6300 pixels, "
        f"a 24-megapixel JPEG, a 2048×2048 RGBA PNG, a truncated GIF, a TIFF) for {hostile['seconds']:g} s: "
        f"peak RSS **{hostile['peak_rss_mb']:.0f} MB**, {hostile['server_errors']} server errors",
        f"- paced load, {load['clients']} clients × {load['rate_per_client']:g} requests/s for "
        f"{load['seconds']:.0f} s: {_http_figures(load)}",
        f"- closed loop, {closed['clients']} clients back to back for {closed['seconds']:.0f} s: "
        f"**{closed['requests_per_second']:,.0f} requests/s**, {_http_figures(closed)}",
        f"- {slow['slow_clients']} slow clients trickling their headers while a client polls `/healthz`: "
        f"its p50 {slow['healthz']['p50_ms']:.2f} ms, p99 **{slow['healthz']['p99_ms']:.2f} ms**, "
        f"{slow['healthz']['errors']} errors",
        f"- whole run: peak RSS **{serving['peak_rss_mb']:.0f} MB**, {server_errors} 5xx answers, "
        f"{serving['log_lines']:,} server log lines, {serving['log_tracebacks']} tracebacks",
    ]
    floor = bench.get("floor")
    if floor:
        float32 = bench["latency"].get("litert_float32", {}).get("p50_ms")
        int8 = bench["latency"].get("litert_int8", {}).get("p50_ms")
        share = f" LiteRT float32 runs at {float32 / floor['floor_ms']:.1f}× that floor." if float32 else ""
        if int8:
            share += (
                f" int8 arithmetic does more multiply-adds per instruction, so the int8 model is not bound by it: "
                f"{int8 / floor['floor_ms']:.1f}× the float32 floor."
            )
        serving_lines += [
            "",
            f"float32 arithmetic floor of one image on this CPU: {floor['multiply_adds'] / 1e6:.2f} M multiply-adds "
            f"at {floor['matmul_gflops_one_thread']:.0f} GFLOP/s (TensorFlow's one-thread float32 matrix multiply) = "
            f"**{floor['floor_ms']:.3f} ms**; no float32 engine can go below it on one thread.{share}",
        ]
    return latency, "\n".join(serving_lines)


def deployment_block(layout: ArtifactLayout) -> str:
    summary = load_optional(layout.deploy_summary)
    if not summary:
        return "*No deployment figures: run stage `05_deploy`.*"
    lines = ["Test accuracy of each deployed form (10,000 images):", ""]
    for row in summary["accuracy"]:
        tolerance = f" (allowed ±{row['tolerance_points']} points)" if row["tolerance_points"] else ""
        agreement = row.get("probability_difference")
        served = (
            f"; served probabilities within {agreement['p99']:.4f} of Keras' on 99% of images "
            f"(median {agreement['p50']:.1e}, worst {agreement['max']:.3f})"
            if agreement
            else ""
        )
        lines.append(
            f"- **{row['model'].replace('_', ' ')}**: {row['test_accuracy']:.4f}, "
            f"{row['difference_points']:+.2f} points from Keras{tolerance}{served}"
        )
    return "\n".join(lines)


QUANTISATION_NOTE = (
    "The study's model in each LiteRT form `05_deploy` compares, judged as served on the test set: accuracy, the "
    "99th percentile of the largest per-class difference from the Keras model's probabilities, single-image "
    'latency (p50, one thread) and size. The exported int8 is "int8 dynamic range": int8 weights, each '
    "layer's input quantised per image as it runs."
)


def quantisation_table(rows: list[dict] | None) -> pd.DataFrame:
    """05_deploy's comparison of quantisation schemes, one row per scheme."""
    if not rows:
        return pd.DataFrame()
    frame = pd.DataFrame(rows).set_index("scheme")
    return pd.DataFrame(
        {
            "test accuracy": frame["test_accuracy"].round(4),
            "probability p99": frame["probability_p99"].round(4),
            "p50 (ms)": frame["p50_ms"].round(4),
            "size (KB)": (frame["size_bytes"] / 1024).round(0).astype("Int64"),
        }
    )


def shipping_block(shipping: dict | None, package_model_sha256: str | None = None) -> str:
    """Which model the classifier ships and why, from 05_deploy's shipping rule, and whether the package's default
    model (``package_model_sha256``: the digest of the file ``fmnist classify`` and ``fmnist serve`` load; None
    when not known) is that file."""
    if not shipping:
        return "*No shipping decision: run stage `05_deploy`.*"
    rows = {row["name"]: row for row in shipping["candidates"]}
    shipped = rows[shipping["shipped"]]
    reference = rows[shipping["reference"]]
    p99 = shipped.get("probability_p99")
    served = (
        f" The probabilities it serves are within {p99:.4f} of its Keras model's for 99% of the test images "
        "(the largest per-class difference per image)."
        if p99 is not None
        else ""
    )
    if "faithful_within_budget" in shipping and not shipping["faithful_within_budget"]:
        served += (
            f" No candidate within budget serves within {shipping['tolerance']} of its Keras model on the "
            "validation images, so the faithfulness clause of the rule did not apply."
        )
    shipped_sha256 = shipping.get("shipped_sha256")
    if package_model_sha256 is None or shipped_sha256 is None:
        installed = "`make ship-model` makes it the default of `fmnist classify` and `fmnist serve`."
    elif package_model_sha256 == shipped_sha256:
        installed = "It is the package's default model: `fmnist classify` and `fmnist serve` answer with this file."
    else:
        installed = (
            "**The package's default model is another file**, so `fmnist classify` and `fmnist serve` do not answer "
            "with it: `make ship-model OUT=<this run's directory>` installs it (`OUT=reports`, the default, for the "
            "reference run)."
        )
    judged_by = shipped.get("judged_by")
    validation = (
        f"validation accuracy {shipped['validation_accuracy']:.4f} (that of {judged_by}, whose settings it trains "
        "on the validation split too: a final fit)"
        if judged_by
        else f"validation accuracy {shipped['validation_accuracy']:.4f}"
    )
    return (
        f"**Rule:** {shipping['rule']}. The reference, {reference['name']}, answers in "
        f"{shipping['reference_p50_ms']:.3f} ms, so the budget is {shipping['budget_ms']:.3f} ms.\n\n"
        f"**Ships: {shipped['name']}** ({shipped['architecture']}), {validation}, {shipped['p50_ms']:.3f} ms per image "
        f"({shipped['latency_ratio']:.2f}x the reference), {shipped['size_bytes'] / 1024:.0f} KB; its test accuracy, "
        f"measured once after the choice, is **{shipping['shipped_test_accuracy']:.4f}**.{served} "
        f"{installed}"
    )


def shipping_table(shipping: dict | None) -> pd.DataFrame:
    """Every candidate of the shipping rule; a figure a candidate has not (no file on disk) reads "–". "p99" is
    how far its int8 file's probabilities are from its Keras model's (99th percentile of the largest
    per-class difference) on the validation images, which the rule reads, and on the test images."""
    if not shipping:
        return pd.DataFrame()
    frame = pd.DataFrame(shipping["candidates"]).set_index("name")
    table = pd.DataFrame(
        {
            "architecture": frame["architecture"],
            "validation accuracy": frame["validation_accuracy"].astype(float).round(4),
            # A final fit's validation accuracy is that of the recipe it refits.
            "judged by": frame.get("judged_by", pd.Series(None, index=frame.index)),
            "int8 p50 (ms)": frame["p50_ms"].astype(float).round(3),
            "x reference": frame["latency_ratio"].astype(float).round(2),
            "int8 size (KB)": (frame["size_bytes"].astype(float) / 1024).round(0).astype("Int64"),
            "p99 validation": frame.get("validation_p99", pd.Series(None, index=frame.index)).astype(float).round(4),
            "p99 test": frame.get("probability_p99", pd.Series(None, index=frame.index)).astype(float).round(4),
            "verdict": frame["reason"],
        }
    )
    return table.astype(object).where(table.notna(), "–")


def compute_block(summary: dict | None) -> str:
    """What the accuracy-against-compute figure shows, with the issue's two budgets."""
    if not summary or not summary.get("recipes"):
        return ""
    rows = summary["recipes"]
    lines = [
        "Training compute counts 6 floating-point operations per multiply-add per training image seen (a distilled "
        "recipe's includes its teacher's training and predictions), so it compares across machines where minutes "
        "do not. The best mean test accuracy within each budget (recipes with several seeds):",
        "",
    ]
    budgets = (("30 TFLOP per seed (the goal: 0.94)", 0, 30), ("300 TFLOP per seed (the moonshot: 0.95)", 30, 300))
    for label, above, limit in budgets:
        within = [
            row
            for row in rows
            if row.get("training_tflops_mean") is not None
            and above < row["training_tflops_mean"] <= limit * 1.001
            and row["seeds"] > 1
        ]
        if within:
            best = max(within, key=lambda row: row["test_accuracy_mean"])
            lines.append(
                f"- **{label}:** {best['recipe']}, {best['test_accuracy_mean']:.4f} ± {best['test_accuracy_std']:.4f} "
                f"over {best['seeds']} seeds with {best['training_tflops_mean']:.1f} TFLOP."
            )
        else:
            lines.append(f"- **{label}:** no recipe with several seeds between {above} and {limit} TFLOP yet.")
    throughput = summary.get("throughput")
    if throughput:
        runs = throughput["runs"]
        share = throughput["float32_augmentation_share"]
        # Timed on its own (probes from before 2026-12-02 did not): a steadier figure than the difference.
        cost = throughput.get("float32_augmentation_cost_share")
        augmentation = f"slows a step by {100 * share:.1f}% (step times with and without it)" + (
            f"; on its own it costs {throughput['augmentation_ms']:.1f} ms per batch, "
            f"{100 * cost:.1f}% of a float32 step"
            if cost is not None
            else ""
        )
        lines.append(
            f"- **Training speed here** ({throughput['recipe']}, {throughput['machine']}): "
            f"{runs['float32_augmented']['gflops']:.0f} GFLOP/s in float32; the augmentation {augmentation}"
            + (
                f"; bfloat16 runs at {throughput['bfloat16_speedup']:.2f}x the float32 speed"
                if "bfloat16_speedup" in throughput
                else "; no native bf16 on this CPU, so no bfloat16 figure"
            )
            + "."
        )
    return "\n".join(lines)


def _runs_were(count: int) -> str:
    return "1 stored run was" if count == 1 else f"{count} stored runs were"


def experiments_code_note(layout: ArtifactLayout) -> str:
    """Which stored experiment runs an earlier training path, or earlier fine-tuning code, produced (kept while
    their recipe is unchanged)."""
    from fmnist.quantisation import fine_tuning_code_version
    from fmnist.runs import file_digest
    from fmnist.training import training_code_version

    current, fine_tuning = training_code_version(), fine_tuning_code_version()
    earlier: dict[str, int] = {}
    fine_tuned: dict[str, int] = {}
    reproduced: list[str] = []
    total = 0
    for path in layout.experiments.all_runs():
        total += 1
        run = read_json(path)
        check = layout.experiments.verification(path.parent.name, run.get("seed"))
        check = read_json(check) if check.is_file() else {}
        # fmnist verify-run retrained this very run file with this code and got every figure again.
        vouched = (
            check.get("identical") is True
            and check.get("training_code") == current
            and check.get("run_sha256") == file_digest(path)
            and (not run.get("quantisation_aware") or check.get("fine_tuning_code") == fine_tuning)
        )
        if vouched:
            reproduced.append(f"{path.parent.name} seed {run.get('seed')} ({check.get('date')})")
            continue
        if run.get("training_code") != current:
            earlier[path.parent.name] = earlier.get(path.parent.name, 0) + 1
        if run.get("quantisation_aware") and run["quantisation_aware"].get("code") != fine_tuning:
            fine_tuned[path.parent.name] = fine_tuned.get(path.parent.name, 0) + 1
    notes = []
    if earlier:
        listing = ", ".join(f"{name} ({count})" for name, count in earlier.items())
        notes.append(
            f"**Caveat: {sum(earlier.values())} of {total} stored runs were trained by an earlier version of the "
            f"training path**: {listing}. They are kept because their recipes are unchanged. The version is a "
            "digest of the training path's code, so any edit to it counts, including one that changes nothing "
            "these recipes compute (a new recipe field, say): this code may not reproduce their figures bit for "
            "bit. `fmnist verify-run RECIPE SEED` retrains one in a temporary directory and compares its figures "
            "with the stored ones; delete `experiments/runs/<recipe>/` and run `make experiments` to retrain them."
        )
    if reproduced:
        notes.append(
            f"**{_runs_were(len(reproduced))} retrained by this code and reproduced every figure exactly** "
            f"(`fmnist verify-run`, its checks in `experiments/verified/`): {', '.join(reproduced)}."
        )
    if fine_tuned:
        listing = ", ".join(f"{name} ({count})" for name, count in fine_tuned.items())
        notes.append(
            f"**{_runs_were(sum(fine_tuned.values()))} fine-tuned for int8 by an earlier version of the "
            f"fine-tuning code** (or before it was recorded): {listing}. They are kept for the same reason."
        )
    return "\n\n".join(notes)


def experiments_block(summary: dict | None) -> str:
    """What the experiments compared and their headline, in words."""
    if not summary:
        return (
            "*No experiments yet: run `fmnist run --stage 06_experiments --stage report` "
            "(about 2 hours with `params/06_experiments.yaml`).*"
        )
    rows = {row["recipe"]: row for row in summary["recipes"]}
    lines = [
        "Each recipe was trained with several seeds and evaluated once on the test set; "
        "tables give the mean ± standard deviation over the seeds. "
        "Hyperparameters and early stopping used only the validation split. "
        f"Published figures are from the [Fashion-MNIST benchmark table]({BENCHMARK_URL}).",
        "",
    ]
    for role, label in ROLE_LABELS.items():
        row = rows.get(summary.get(role, ""))
        if row:
            heading = label[0].upper() + label[1:]
            lines.append(
                f"- **{heading}, {row['recipe']}**: test accuracy {row['test_accuracy_mean']:.4f} ± "
                f"{row['test_accuracy_std']:.4f}, loss {row['test_loss_mean']:.4f} ± {row['test_loss_std']:.4f} "
                f"({row['seeds']} seeds, {row['parameters']:,} parameters, "
                f"{row['train_seconds_mean'] / 60:.1f} min of training per seed)."
            )
    settled = summary.get("contradiction")
    if settled:
        better = settled["tuned"] if settled["accuracy_difference"] > 0 else settled["stated"]

        def figures(which: str) -> str:
            accuracy, std, loss = (settled[f"{which}_{key}"] for key in ("accuracy", "accuracy_std", "loss"))
            return f"{accuracy:.4f} ± {std:.4f} (loss {loss:.4f})"

        lines.append(
            f"- **The seed's contradiction, measured:** its stated training recipe ({settled['stated']}) reaches "
            f"{figures('stated')}, the tuned one ({settled['tuned']}) {figures('tuned')}: **{better}** is better by "
            f"{abs(settled['accuracy_difference']) * 100:.2f} points."
        )
    machines: dict[str, list[str]] = {}
    for row in summary["recipes"]:
        if row.get("latency_machine"):
            machines.setdefault(row["latency_machine"], []).append(row["recipe"])
    if len(machines) > 1:
        listing = "; ".join(f"{', '.join(names)} on {machine}" for machine, names in machines.items())
        lines.append(
            f"- **Latencies come from different machines** (models not on disk keep their earlier figures): "
            f"{listing}. Compare latencies only within one machine."
        )
    if summary.get("missing_runs"):
        lines.append(
            f"- **Incomplete:** {len(summary['missing_runs'])} planned runs are not trained yet "
            f"({', '.join(summary['missing_runs'])}); rerun the stage to add them."
        )
    if summary.get("train_subset"):
        lines.append(f"- Trained on a {summary['train_subset']:,}-image subset: a smoke run, not the reference.")
    return "\n".join(lines)


def study_seed(manifest: dict) -> str:
    """'seed 42': the one seed the study's model (03_train) was trained with, for the figures that show it."""
    seed = manifest.get("stages", {}).get("03_train", {}).get("parameters", {}).get("seed")
    return f"seed {seed}" if seed is not None else "one seed"


def per_class_reading(metrics: dict | None, manifest: dict | None = None) -> str:
    """Which classes the model gets right and which it does not, in one paragraph."""
    if not metrics:
        return ""
    per_class = metrics["per_class"]
    ranked = sorted(per_class, key=lambda name: per_class[name]["f1"])
    hardest, easiest = ranked[:3], ranked[-3:]
    listing = ", ".join(f"{name} ({per_class[name]['f1']:.2f})" for name in hardest)
    floor = math.floor(100 * min(per_class[name]["f1"] for name in easiest)) / 100  # Never rounded up.
    return (
        f"The study's model ({study_seed(manifest or {})}) on the {metrics['test_size']:,} test images: "
        f"macro F1 {metrics['macro_f1']:.4f}. "
        f"The hardest classes by F1 are {listing}"
        + (
            ": upper-body garments that differ in collars, sleeves and fastenings more than in outline, which "
            "28×28 pixels barely show"
            if set(hardest) <= UPPER_BODY
            else ""
        )
        + f". {', '.join(easiest)} score at least {floor:.2f}."
    )


def confusion_reading(metrics: dict | None) -> str:
    """The mistakes in numbers: how many, and which pairs make most of them."""
    if not metrics or not metrics.get("most_confused_pairs"):
        return ""
    pairs = metrics["most_confused_pairs"]
    errors = metrics["test_error_count"]
    top = sum(pair["count"] for pair in pairs)
    first = pairs[0]
    return (
        f"{errors:,} of the {metrics['test_size']:,} test images are misclassified. The {len(pairs)} most frequent "
        f"confusions below make {100 * top / errors:.0f}% of them; the largest is {first['true']} taken for "
        f"{first['predicted']} ({first['count']} images). Rows are true classes, columns predictions."
    )


def ablation_reading(summary: dict | None, manifest: dict) -> str:
    """What the ablation shows, on which seeds, and how large seed noise is beside it."""
    if not summary or not summary.get("ablation"):
        return ""
    rows = summary["ablation"]
    base = rows[0]
    parameters = manifest.get("stages", {}).get("06_experiments", {}).get("parameters", {})
    seeds = parameters.get("ablation_seeds")
    seed_text = f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}" if seeds else "shared seeds"
    strong = next((row for row in summary.get("recipes", []) if row["recipe"] == base["model"]), None)
    noise = (
        f" Over its {strong['seeds']} seeds the full recipe's test accuracy varies by ±"
        f"{100 * strong['test_accuracy_std']:.2f} points (one standard deviation), so smaller changes are noise."
        if strong and strong["seeds"] > 1
        else ""
    )
    worst = min(rows[1:], key=lambda row: row["accuracy_change"], default=None)
    largest = (
        f" The largest loss comes from {worst['change']} ({100 * worst['accuracy_change']:+.2f} points)."
        if worst and worst["accuracy_change"] < 0
        else ""
    )
    return (
        f"Each row changes one ingredient of {base['model']} and trains it again on {seed_text} "
        f"({plural(base['seeds'], 'run')} per row); the full recipe scores {base['test_accuracy']:.4f} there. "
        "TTA is toggled on the trained models, at no training cost." + largest + noise
    )


def calibration_reading(summary: dict | None) -> str:
    """Which models and seeds the reliability diagram shows, and what their ECE says."""
    if not summary or not summary.get("calibration"):
        return ""
    rows = {row["recipe"]: row for row in summary.get("recipes", [])}
    parts = []
    for name, calibration in summary["calibration"].items():
        row = rows.get(name, {})
        mean = (
            f"; {row['ece_mean']:.4f} as the mean over its {row['seeds']} seeds (the table's figure)"
            if row.get("ece_mean") is not None and row.get("seeds", 0) > 1
            else ""
        )
        parts.append(f"{name}: ECE {calibration['ece']:.4f} for seed {calibration['seed']}{mean}")
    return (
        "Expected calibration error (15 equal-width confidence bins, test set) is the gap between confidence and "
        "accuracy, weighted by how many images fall in each bin: 0 is perfectly calibrated. The diagram shows "
        f"one seed per model, as its legend says. {'. '.join(parts)}. A line under the diagonal is over-confident."
    )


def headline_table(metrics: dict[str, Any]) -> pd.DataFrame:
    """Test accuracy and loss: the seed's claim, ours, and the difference."""
    frame = pd.DataFrame(metrics["seed_comparison"]).T.rename(columns={"seed": "seed document", "ours": "this study"})
    frame.index = ["test accuracy", "test loss"]
    return frame.round(4)


def per_class_table(metrics: dict[str, Any]) -> pd.DataFrame:
    frame = pd.DataFrame(metrics["per_class"]).T
    frame["support"] = frame["support"].astype(int)
    return frame.round(4)


def stage_table(manifest: dict[str, Any]) -> pd.DataFrame:
    """Wall time and parameters of each stage that ran."""
    rows = []
    for stage in ALL_STAGES:
        entry = manifest.get("stages", {}).get(stage)
        if not entry:
            continue
        parameters = {k: v for k, v in entry.get("parameters", {}).items() if k != "out_dir"}
        record = entry.get("run") or {}
        rows.append(
            {
                "stage": stage,
                "run": record.get("run_id", "?"),
                "wall time (s)": entry.get("runner_wall_time_seconds") or entry.get("wall_time_seconds"),
                "parameters": ", ".join(f"{k}={v}" for k, v in parameters.items()),
            }
        )
    return pd.DataFrame(rows).set_index("stage") if rows else pd.DataFrame()


def checksum_table(manifest: dict[str, Any]) -> pd.DataFrame:
    for entry in manifest.get("stages", {}).values():
        if entry.get("data"):
            data = entry["data"]
            frame = pd.DataFrame({"SHA-256 of decompressed content": data["checksums"]})
            frame.index.name = f"file ({data['source']})"
            return frame
    return pd.DataFrame()


def environment_table(manifest: dict[str, Any]) -> pd.DataFrame:
    git = manifest.get("git", {})
    rows = {
        "run id": manifest.get("run_id"),
        "git commit": f"{git.get('commit')}{' (with uncommitted changes)' if git.get('dirty') else ''}",
        "machine": describe_machine(manifest["machine"]) if manifest.get("machine") else manifest.get("processor"),
        "python": manifest.get("python"),
        "platform": manifest.get("platform"),
        "params profile": manifest.get("params_profile"),
        "manifest written": manifest.get("created"),
        **{f"package {name}": version for name, version in manifest.get("packages", {}).items()},
    }
    return pd.DataFrame({"value": rows})


def notebook_links(layout: ArtifactLayout) -> str:
    """Markdown links to each executed stage notebook, as HTML and as .ipynb."""
    lines = []
    for stage in (*STAGES, *OPTIONAL_STAGES):
        html = layout.executed_notebooks / f"{stage}.html"
        ipynb = layout.executed_notebooks / f"{stage}.ipynb"
        if ipynb.is_file():
            lines.append(f"- **{stage}**: [HTML](notebooks/{html.name}) · [notebook](notebooks/{ipynb.name})")
    return "\n".join(lines) or "*No executed stage notebooks found.*"


def _has_content(cell) -> bool:
    """Whether a cell shows something: markdown text, printed text, or a non-empty display.

    A display's ``text/plain`` counts only when it is all there is: ``Markdown("")`` also carries
    "<IPython.core.display.Markdown object>" as plain text, and shows nothing. Stderr (warnings,
    progress) is not content.
    """
    if cell.cell_type == "markdown":
        return bool(cell.source.strip())
    for output in cell.get("outputs", []):
        kind = output.get("output_type")
        if kind == "stream":
            if output.get("name") == "stdout" and "".join(output.get("text", "")).strip():
                return True
        elif kind in ("display_data", "execute_result"):
            data = output.get("data", {})
            rich = {key: value for key, value in data.items() if key != "text/plain"}
            if rich:
                texts = ("".join(value) if isinstance(value, list) else str(value) for value in rich.values())
                if any(text.strip() for text in texts):
                    return True
            elif "".join(data.get("text/plain", "")).strip() not in ("", "None"):
                return True
        elif kind == "error":
            return True
    return False


def _heading_level(cell) -> int:
    """The level of a markdown cell that starts with a heading (0 for any other cell)."""
    if cell.cell_type != "markdown":
        return 0
    match = re.match(r"(#{1,6})\s", cell.source.lstrip())
    return len(match.group(1)) if match else 0


def drop_empty_sections(notebook):
    """Remove each heading whose section (up to the next heading of its level or higher) shows nothing.

    A smoke or partial run then has no empty "Ablation" or "Calibration" headings. The heading cell's own
    text after the heading line counts as nothing, since it only introduces what follows.
    """
    cells = notebook.cells
    keep = []
    for index, cell in enumerate(cells):
        level = _heading_level(cell)
        if not level:
            keep.append(cell)
            continue
        shown = False
        for following in cells[index + 1 :]:
            following_level = _heading_level(following)
            if following_level and following_level <= level:
                break
            if not following_level and _has_content(following):
                shown = True
                break
        if shown:
            keep.append(cell)
    notebook.cells = keep
    return notebook


CONTENTS_STYLE = (
    ".fmnist-contents{font-family:var(--jp-content-font-family);font-size:var(--jp-content-font-size1);"
    "line-height:1.6;margin:0 0 1em 0;padding:0.5em 1.5em;border:1px solid var(--jp-border-color2);"
    "border-radius:4px;max-width:40em}"
    ".fmnist-contents .toc-title{font-size:1.2em;margin:0.3em 0}"
    ".fmnist-contents ul{list-style:none;padding-left:0;margin:0}"
    ".fmnist-contents .toc-h3{padding-left:1.5em}"
    ".fmnist-contents a{color:var(--jp-content-link-color);text-decoration:none}"
    ".fmnist-contents a:hover,.fmnist-contents a:focus{text-decoration:underline}"
)


def add_contents(page: str) -> str:
    """Insert a table of contents, linking every h2 and h3 of the page by its id, before the first h2's cell."""
    headings = [
        (int(level), ident, re.sub(r"<[^>]+>|¶", "", text).strip())
        for level, ident, text in re.findall(r'<h([23]) id="([^"]+)"[^>]*>(.*?)</h\1>', page, flags=re.S)
    ]
    if not headings:
        return page
    items = []
    for level, ident, text in headings:
        # The id is already HTML-escaped in the page (nbconvert writes "A &amp; B"): escape it once, not twice.
        items.append(f'<li class="toc-h{level}"><a href="#{html.escape(html.unescape(ident))}">{text}</a></li>')
    nav = (
        f"<style>{CONTENTS_STYLE}</style>"
        '<nav id="contents" aria-label="Contents" class="fmnist-contents"><h2 class="toc-title">Contents</h2>'
        f"<ul>{''.join(items)}</ul></nav>"
    )
    first = page.index(f'<h{headings[0][0]} id="{headings[0][1]}"')
    cell_start = page.rfind('<div class="jp-Cell ', 0, first)
    at = cell_start if cell_start != -1 else first
    return page[:at] + nav + page[at:]


def _export(notebook_file: Path, target: Path, *, hide_code: bool, report: bool = False) -> Path:
    import nbformat
    from nbconvert import HTMLExporter

    exporter = HTMLExporter(
        template_name="fmnist_offline",
        extra_template_basedirs=[str(PACKAGE_DIR / "assets" / "nbconvert")],
        exclude_input=hide_code,
        exclude_input_prompt=hide_code,
        exclude_output_prompt=hide_code,
    )
    notebook = nbformat.read(notebook_file, as_version=4)
    if report:
        drop_empty_sections(notebook)
    body, _ = exporter.from_notebook_node(notebook)
    return write_text(target, add_contents(body) if report else body)


def render_report(layout: ArtifactLayout) -> Path:
    """Render the executed report notebook (code hidden) and each stage notebook (code shown) to HTML."""
    for stage in (*STAGES, *OPTIONAL_STAGES):
        executed = layout.executed_notebooks / f"{stage}.ipynb"
        if executed.is_file():
            _export(executed, executed.with_suffix(".html"), hide_code=False)
    executed_report = layout.executed_notebooks / f"{REPORT_NOTEBOOK}.ipynb"
    if not executed_report.is_file():
        raise FileNotFoundError(f"{executed_report}: the report notebook has not been executed.")
    return _export(executed_report, layout.report, hide_code=True, report=True)
