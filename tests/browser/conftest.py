"""Browser fixtures: one live `tunesmith serve` (tiny model) and one headless chromium per
module, driven through Playwright's sync API.

Playwright is imported inside the fixtures: where it or chromium is missing, the test module
skips itself with one line saying how to enable it, and this file must still import.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import LiveServer, start_server


@pytest.fixture(scope="module")
def dash(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path,
         test_home: Path) -> Iterator[LiveServer]:
    """A live server with two base models (the playground compares two)."""
    # a generous start timeout: on a busy machine the start is slow, not broken
    server = start_server(tmp_path_factory.mktemp("dash"), tiny_model_dir, test_home,
                          "--model", f"tiny-b={tiny_model_dir}", timeout=600)
    try:
        yield server
    finally:
        server.kill_group()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        # Debian's chromium, not a downloaded one (`playwright install` needs the internet)
        b = p.chromium.launch(executable_path=shutil.which("chromium"), headless=True)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def open_page(browser: Any, dash: LiveServer, tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """``open_page(width=1280, height=800)``: a fresh page (its own sessionStorage) at the
    dashboard; every page is closed at the end, and console errors fail the test."""
    contexts, errors = [], []

    def make(width: int = 1280, height: int = 800) -> Any:
        context = browser.new_context(viewport={"width": width, "height": height},
                                      accept_downloads=True)
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(60_000)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("dialog", lambda d: d.accept())
        return page

    yield make
    for context in contexts:
        context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def sign_in(page: Any, server: LiveServer, org: str = "acme") -> None:
    """Sign in with the keyboard alone: the key field has focus when the page opens."""
    page.goto(server.url + "/")
    page.wait_for_selector("#api-key:focus")
    page.keyboard.type(server.key(org))
    page.keyboard.press("Enter")
    page.get_by_role("heading", name="Fine-tuning jobs").wait_for()


def shot(page: Any, folder: Path, name: str) -> None:
    page.screenshot(path=str(folder / f"{name}.png"), full_page=True)
