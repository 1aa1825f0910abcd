"""Refresh the pictures under docs/: the web page after one prompt, and that prompt's grid.png.

python scripts/screenshots.py    (needs the app and test extras, and a Chromium binary)
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from pathlib import Path

from playwright.sync_api import sync_playwright

from conceptattention.app import launch

PROMPT, CONCEPTS = "a red circle and a blue square on grass", "circle square grass"
DOCS = Path(__file__).resolve().parent.parent / "docs"


def main() -> None:
    DOCS.mkdir(exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    served = launch("shapes", port=port, block=False)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1280, "height": 1500})
            page.goto(f"http://127.0.0.1:{port}")
            page.locator("#prompt textarea").fill(PROMPT)
            page.locator("#gen-concepts textarea").fill(CONCEPTS)
            page.locator("#generate").click()
            page.wait_for_selector("#overlays img", timeout=120_000)
            page.wait_for_timeout(1500)
            page.screenshot(path=str(DOCS / "app.png"), full_page=True)
            browser.close()
    finally:
        served.close()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "conceptattention",
            "generate",
            PROMPT,
            "-c",
            *CONCEPTS.split(),
            "-o",
            str(DOCS / "example"),
            "-q",
        ],
        check=True,
    )
    shutil.copy(DOCS / "example" / "grid.png", DOCS / "grid.png")
    shutil.copy(DOCS / "example" / "segmentation.png", DOCS / "segmentation.png")
    shutil.rmtree(DOCS / "example")
    print("wrote", *(DOCS / n for n in ("app.png", "grid.png", "segmentation.png")))


if __name__ == "__main__":
    main()
