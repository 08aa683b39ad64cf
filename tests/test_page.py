"""The web page in a real headless Chromium: upload an image, see the right label."""

from __future__ import annotations

import os
import shutil
import threading

import pytest
from test_serve import png_bytes, trouser

from fmnist.inference import Classifier
from fmnist.serve import make_server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if not CHROMIUM and os.environ.get("CI") != "true":
    pytest.skip(
        "Debian's chromium is not installed (apt-get install chromium); CI installs it", allow_module_level=True
    )
sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def base_url():
    server = make_server(Classifier(), port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def page(base_url):
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page()
        page.goto(base_url)
        yield page
        browser.close()


def test_uploading_an_image_shows_the_right_label(page, tmp_path):
    image = tmp_path / "trousers.png"
    image.write_bytes(png_bytes(trouser()))
    page.set_input_files("#file", str(image))
    page.wait_for_selector("#result .bar", timeout=10_000)
    labels = page.locator("#result .bar .label").all_inner_texts()
    assert len(labels) == 3 and labels[0] == "Trouser"
    assert "%" in page.locator("#result .bar .pct").first.inner_text()
    assert "ms" in page.locator("#status").inner_text()
    page.screenshot(path=str(tmp_path / "page.png"))


def test_a_bad_file_shows_the_error_and_the_page_recovers(page, tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    page.set_input_files("#file", str(bad))
    page.wait_for_selector("#status.error", timeout=10_000)
    assert "not an image" in page.locator("#status").inner_text()
    good = tmp_path / "trousers.png"
    good.write_bytes(png_bytes(trouser()))
    page.set_input_files("#file", str(good))
    page.wait_for_function("document.querySelector('#status').className === ''", timeout=10_000)
    assert page.locator("#result .bar .label").first.inner_text() == "Trouser"
