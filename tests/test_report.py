"""The report's pieces that need no run: the banner, empty sections, the contents."""

from __future__ import annotations

import html
import re

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from fmnist import report

MACHINE = {"cpu": "Intel Xeon Platinum 8488C", "cores": 2, "features": ["avx2", "amx_bf16"]}


def manifest(profile: str, stages: tuple[str, ...]) -> dict:
    return {
        "run_id": "20261130T000000Z-abcdef",
        "params_profile": profile,
        "machine": MACHINE,
        "git": {"commit": "0123456789abcdef", "dirty": False},
        "stages": {stage: {"runner_wall_time_seconds": 60.0} for stage in stages},
    }


STUDY = ("01_eda", "02_tune", "03_train", "04_evaluate", "05_deploy")


def test_the_banner_names_run_profile_machine_and_times_apart():
    summary = {"recipes": [{"recipe": "a", "seeds": 3, "train_seconds_mean": 2400.0}]}
    banner = report.banner_block(manifest("params", (*STUDY, "06_experiments")), summary)
    assert "Not the reference" not in banner and "Partial" not in banner
    assert "20261130T000000Z-abcdef" in banner and "`params` (the reference study)" in banner
    assert "Intel Xeon Platinum 8488C, 2 cores (avx2, amx_bf16)" in banner
    # The study's five stages (5 min) and the experiments (1 min here, 3 stored runs of 40 min) separately.
    assert "the study (01_eda to 05_deploy) took **5.0 min**" in banner
    assert "06_experiments took 60 s in this run" in banner and "3 stored runs" in banner and "2.0 h" in banner


def test_a_smoke_or_partial_run_says_so_first():
    banner = report.banner_block(manifest("params/smoke", ("01_eda", "03_train")))
    lines = banner.splitlines()
    assert "Not the reference study" in lines[0] and "params/smoke" in lines[0]
    assert "Partial run: 02_tune, 04_evaluate, 05_deploy did not run" in banner


def test_a_report_of_nothing_yet_still_has_a_banner():
    # An interactive report before any stage ran: no manifest at all.
    banner = report.banner_block({})
    assert "Partial run: 01_eda, 02_tune, 03_train, 04_evaluate, 05_deploy did not run" in banner
    assert "no study stage ran" in banner and "run by hand" in banner.splitlines()[0]
    assert "took **" in report.banner_block(manifest("params", ("03_train",)))


def _markdown(text: str):
    return new_markdown_cell(text)


def _shows(text: str):
    cell = new_code_cell("display(...)")
    cell.outputs = [new_output("display_data", data={"text/markdown": text})]
    return cell


def _shows_nothing():
    cell = new_code_cell("if summary: ...")
    # A warning on stderr, and a Markdown("") (whose plain-text form is its repr), show nothing.
    cell.outputs = [
        new_output("stream", name="stderr", text="a warning\n"),
        new_output("display_data", data={"text/markdown": "", "text/plain": "<IPython.core.display.Markdown object>"}),
    ]
    return cell


def _prints(text: str):
    cell = new_code_cell("print(...)")
    cell.outputs = [new_output("stream", name="stdout", text=text)]
    return cell


def test_headings_of_sections_that_show_nothing_are_left_out():
    notebook = new_notebook(
        cells=[
            _markdown("## Experiments"),
            _shows_nothing(),
            _markdown("### Ablation"),
            _shows_nothing(),
            _markdown("### Compute"),
            _shows("a table"),
            _markdown("## Calibration\n\nWhat calibration is."),
            _shows_nothing(),
            _markdown("## The data"),
            _shows("the figures"),
            _markdown("## Printed"),
            _prints("a line of results\n"),
            _markdown("## Explained"),
            _markdown("A paragraph of text is content too."),
        ]
    )
    kept = report.drop_empty_sections(notebook)
    headings = [cell.source.splitlines()[0] for cell in kept.cells if cell.cell_type == "markdown"]
    # A parent with content in a subsection stays; an empty subsection and an empty section go.
    assert headings == [
        "## Experiments",
        "### Compute",
        "## The data",
        "## Printed",
        "## Explained",
        "A paragraph of text is content too.",
    ]
    assert nbformat.validate(kept) is None


def test_the_contents_link_every_section_heading_by_its_id():
    page = (
        '<body><div class="jp-Cell"><h1 id="Title">Title</h1></div>'
        '<div class="jp-Cell"><h2 id="Results">Results<a class="anchor-link" href="#Results">¶</a></h2></div>'
        '<div class="jp-Cell"><h3 id="Per-class">Per <em>class</em></h3></div>'
        '<div class="jp-Cell"><h2 id="The-seed\'s-data">The seed\'s data</h2></div></body>'
    )
    rendered = report.add_contents(page)
    assert rendered.index('<nav id="contents"') < rendered.index('<h2 id="Results"')
    assert rendered.index('<h1 id="Title"') < rendered.index('<nav id="contents"')
    assert '<li class="toc-h2"><a href="#Results">Results</a></li>' in rendered
    assert '<li class="toc-h3"><a href="#Per-class">Per class</a></li>' in rendered
    assert 'href="#The-seed&#x27;s-data"' in rendered
    assert report.add_contents("<p>no headings</p>") == "<p>no headings</p>"


def test_the_contents_of_a_real_nbconvert_page_resolve_with_ampersands_and_quotes():
    from nbconvert import HTMLExporter

    notebook = new_notebook(
        cells=[
            _markdown("# Title"),
            _markdown("## Size & latency"),
            _markdown("Text."),
            _markdown("### The seed's tuning"),
            _markdown("Text."),
        ]
    )
    page, _ = HTMLExporter(template_name="lab").from_notebook_node(notebook)
    rendered = report.add_contents(page)
    contents = rendered[rendered.index('<nav id="contents"') : rendered.index("</nav>")]
    links = re.findall(r'href="#([^"]+)"', contents)
    assert len(links) == 2
    # Each link, as a browser decodes it, is the id of exactly one heading of the page.
    ids = [html.unescape(ident) for ident in re.findall(r'<h[23] id="([^"]+)"', rendered)]
    assert [html.unescape(link) for link in links] == ids
    # The box comes before the first section's cell, not inside it.
    first_cell = rendered.rfind('<div class="jp-Cell ', 0, rendered.index('<h2 id="'))
    assert rendered.index('<nav id="contents"') < first_cell


def test_the_shipping_block_says_how_faithfully_the_shipped_file_serves_its_model():
    candidate = {
        "name": "student",
        "architecture": "bn_cnn",
        "validation_accuracy": 0.94,
        "p50_ms": 0.02,
        "latency_ratio": 1.3,
        "size_bytes": 110 * 1024,
        "reason": "within budget",
        "probability_p99": 0.0213,
        "validation_p99": 0.0094,
    }
    reference = {
        **candidate,
        "name": "seed",
        "architecture": "seed",
        "latency_ratio": 1.0,
        "probability_p99": None,
        "validation_p99": None,
    }
    shipping = {
        "rule": "the rule",
        "reference": "seed",
        "reference_p50_ms": 0.015,
        "budget_ms": 0.0225,
        "candidates": [reference, candidate],
        "shipped": "student",
        "shipped_test_accuracy": 0.935,
        "tolerance": 0.01,
        "faithful_within_budget": 1,
    }
    block = report.shipping_block(shipping)
    assert "**Ships: student**" in block and "within 0.0213 of its Keras model's for 99% of the test images" in block
    assert "did not apply" not in block
    table = report.shipping_table(shipping)
    assert table["p99 test"].tolist() == ["–", 0.0213] and table["int8 size (KB)"].tolist() == [110, 110]
    assert table["p99 validation"].tolist() == ["–", 0.0094]
    # Whether the package's default model is the chosen file, by digest; unknown without one (an older record).
    assert "make ship-model` makes it the default" in block and "package's default model" not in block
    shipping["shipped_sha256"] = "ab" * 32
    assert "It is the package's default model" in report.shipping_block(shipping, "ab" * 32)
    other = report.shipping_block(shipping, "cd" * 32)
    assert "The package's default model is another file" in other
    assert "`make ship-model OUT=<this run's directory>`" in other
    shipping["faithful_within_budget"] = 0
    assert "the faithfulness clause of the rule did not apply" in report.shipping_block(shipping)
    # A shipping record from before the figures existed reads as before, with empty columns.
    for row in shipping["candidates"]:
        del row["probability_p99"], row["validation_p99"]
    del shipping["faithful_within_budget"]
    block = report.shipping_block(shipping)
    assert "99%" not in block and "did not apply" not in block
    assert report.shipping_table(shipping)["p99 test"].tolist() == ["–", "–"]


def test_the_latency_figure_keeps_to_one_machine_and_every_recipe_has_its_own_look():
    import matplotlib.pyplot as plt

    from fmnist import plots

    names = [f"recipe_{index}" for index in range(12)]
    styles = plots.recipe_styles(names)
    assert len({(tuple(style["color"]), style["marker"]) for style in styles.values()}) == 12
    assert len({tuple(style["color"]) for style in styles.values()}) == 12  # Beyond tab10's 10 colours.

    def row(name, latency, machine):
        return {
            "recipe": name,
            "test_accuracy_mean": 0.93,
            "test_accuracy_std": 0.001,
            "litert_int8_p50_ms": latency,
            "latency_machine": machine,
        }

    rows = [
        row("old", 0.15, plots.EARLIER_MACHINE),  # Kept from a run on another machine: left out.
        row("a", 0.02, "AMD EPYC, 2 cores (avx2, avx512f)"),
        row("b", 0.05, "AMD EPYC, 2 cores (avx2, avx512f)"),
        row("untimed", None, None),
    ]
    figure = plots.accuracy_vs_latency(rows)
    axis = figure.axes[0]
    assert [text.get_text() for text in axis.get_legend().get_texts()] == ["a", "b"]
    assert axis.get_title() == "Accuracy against latency, timed on AMD EPYC, 2 cores"
    assert any("1 recipe timed on another machine left out" in text.get_text() for text in axis.texts)
    plt.close(figure)
    # Only earlier figures: those are shown, and nothing is said to be left out.
    figure = plots.accuracy_vs_latency([rows[0]])
    assert [text.get_text() for text in figure.axes[0].get_legend().get_texts()] == ["old"]
    assert not figure.axes[0].texts
    plt.close(figure)


def test_the_compute_block_gives_the_augmentations_cost_timed_on_its_own_when_the_probe_recorded_it():
    throughput = {
        "recipe": "bn_cnn_deep",
        "machine": "AMD EPYC",
        "runs": {"float32_augmented": {"gflops": 80.0, "step_ms": 50.0}},
        "float32_augmentation_share": 0.12,
        "bfloat16_speedup": 1.2,
    }
    summary = {"recipes": [{"recipe": "a", "training_tflops_mean": None}], "throughput": throughput}
    older = report.compute_block(summary)
    assert "slows a step by 12.0% (step times with and without it)" in older and "on its own" not in older
    throughput.update(augmentation_ms=2.0, float32_augmentation_cost_share=0.04)
    text = report.compute_block(summary)
    assert "on its own it costs 2.0 ms per batch, 4.0% of a float32 step" in text and "1.20x the float32 speed" in text
