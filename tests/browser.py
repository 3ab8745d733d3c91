"""A real Chromium driven by Playwright, for the dashboard's tests: the one the system's packages
install (Debian: `apt-get install -y chromium`), never a browser Playwright downloads.

    with chromium() as browser:
        page = browser.new_context().new_page()

MLX_MANAGER_TEST_CHROMIUM names another executable (a Mac's Chrome, say). A missing browser
fails the test with what to install: it never skips silently.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from typing import Any

import pytest

CHROMIUM_ENV = "MLX_MANAGER_TEST_CHROMIUM"
DEFAULT_CHROMIUM = "/usr/bin/chromium"
# Headless, no sandbox (CI runs as root), and nothing that reaches out to the internet.
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def chromium_path() -> str:
    return os.environ.get(CHROMIUM_ENV) or DEFAULT_CHROMIUM


@contextlib.contextmanager
def chromium() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    path = chromium_path()
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        found = shutil.which("chromium") or shutil.which("chromium-browser")
        also = f" (one is at {found}: set {CHROMIUM_ENV}={found})" if found else ""
        pytest.fail(
            f"the dashboard's browser tests need Chromium at {path}{also}. Install it with "
            f"`apt-get update && apt-get install -y chromium`, or point {CHROMIUM_ENV} at a Chromium or Chrome.",
            pytrace=False,
        )
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=path, args=ARGS)
        try:
            yield browser
        finally:
            browser.close()


def painted_pixels(page: Any, selector: str) -> int:
    """How many pixels of the canvas at `selector` are not transparent: 0 for one never drawn on."""
    return page.evaluate(
        """(selector) => {
            const canvas = document.querySelector(selector);
            const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
            let painted = 0;
            for (let i = 3; i < data.length; i += 4) if (data[i]) painted += 1;
            return painted;
        }""",
        selector,
    )
