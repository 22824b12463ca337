"""A real Chromium (Debian's, never a downloaded one) driven by Playwright, and screenshots.

`make test` installs /usr/bin/chromium where it is missing (see the Makefile's `browser`).
Each test's screenshots go to its tmp_path and to test-artifacts/ at the repository root.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, sync_playwright

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).parent.parent.parent / "test-artifacts"
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Chromium, headless, for one test module.

    Not for the session: Playwright's sync API runs an asyncio loop on this thread while it
    is open, and the other tests call `asyncio.run`.
    """
    assert Path(CHROMIUM).exists(), f"{CHROMIUM} is missing: `make test` installs it (as root)"
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """A fresh page in a context of its own (its own session storage)."""
    context = browser.new_context(viewport={"width": 1000, "height": 720})
    opened = context.new_page()
    yield opened
    context.close()


@pytest.fixture
def snap(tmp_path: Path, request: pytest.FixtureRequest) -> object:
    """Take a screenshot of a page into the test's artefacts (and test-artifacts/)."""
    ARTIFACTS.mkdir(exist_ok=True)

    def take(page: Page, name: str) -> Path:
        path = tmp_path / f"{name}.png"
        page.screenshot(path=str(path), full_page=True)
        shutil.copy(path, ARTIFACTS / f"{request.node.name}-{name}.png")
        return path

    return take
