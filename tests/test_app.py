"""The web page, driven in a real headless browser (Playwright + the system's Chromium)."""

from __future__ import annotations

import io
import os
import shutil
import socket
import zipfile

import numpy as np
import pytest

pytest.importorskip("gradio")
sync_api = pytest.importorskip("playwright.sync_api")

CHROMIUM = next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser")) if p), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs a Chromium binary (apt-get install chromium)")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served():
    from conceptattention.app import launch

    port = free_port()
    page_app = launch("shapes", port=port, block=False)
    yield f"http://127.0.0.1:{port}"
    page_app.close()


@pytest.fixture
def page(served):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        tab = browser.new_page(viewport={"width": 1280, "height": 1400})
        tab.goto(served)
        yield tab
        browser.close()


def test_prompt_and_concepts_give_images_in_the_page(page):
    page.locator("#prompt textarea").fill("a yellow triangle and a green circle in the sky")
    page.locator("#gen-concepts textarea").fill("triangle, circle sky")
    page.locator("#generate").click()
    page.wait_for_selector("#overlays img", timeout=120_000)
    page.wait_for_selector("#image-out img", timeout=30_000)
    page.wait_for_selector("#segmentation img", timeout=30_000)
    assert page.locator("#overlays img").count() >= 3
    labels = page.locator("#overlays").inner_text()
    for word in ("triangle", "circle", "sky"):
        assert word in labels
    link = page.locator("#download a").first
    link.wait_for(timeout=30_000)
    href = link.get_attribute("href")
    assert href.endswith("conceptattention_maps.zip")
    archive = zipfile.ZipFile(io.BytesIO(page.request.get(href).body()))  # the download really serves the arrays
    assert {"maps.npy", "maps_raw.npy", "result.json"} <= set(archive.namelist())
    maps = np.load(io.BytesIO(archive.read("maps.npy")))
    assert maps.shape == (3, 64, 64) and np.allclose(maps.sum(0), 1.0, atol=1e-4)


def test_bad_input_shows_one_clear_message(page):
    page.locator("#gen-concepts textarea").fill("")
    page.locator("#generate").click()
    page.get_by_text("enter at least one concept word").first.wait_for(timeout=60_000)
    page.locator("#prompt textarea").fill("a purple dog")
    page.locator("#gen-concepts textarea").fill("dog")
    page.locator("#generate").click()
    page.get_by_text("does not know").first.wait_for(timeout=60_000)
