"""A real headless browser for page tests: Debian's Chromium driven by Playwright, which never downloads its own."""

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("XIAOLM_CHROMIUM", "/usr/bin/chromium")
# No network beyond the page's own server, no profile state, no GPU: the same run on any machine.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium_path() -> str:
    """The Chromium binary to drive; fails the test (never skips it) with how to install it when missing."""
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        pytest.fail(f"no Chromium at {CHROMIUM}: the web page tests need a real browser. Install Debian's "
                    "`apt-get install chromium fonts-wqy-microhei` (`make test` does it when run as root), "
                    "or point XIAOLM_CHROMIUM at a Chromium binary", pytrace=False)
    return CHROMIUM


@contextmanager
def chromium_page(profile_dir: Path, width: int = 1000, height: int = 680) -> Iterator:
    """A Playwright Page in a fresh headless Chromium with its own profile dir; closed on exit."""
    from playwright.sync_api import sync_playwright

    executable = chromium_path()
    shutil.rmtree(profile_dir, ignore_errors=True)
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(profile_dir), executable_path=executable, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": width, "height": height}, locale="zh-CN")
        try:
            yield context.pages[0] if context.pages else context.new_page()
        finally:
            context.close()


def save_screenshot(page, name: str, out_dir: Path) -> list[Path]:
    """Screenshot the page into out_dir and, when XIAOLM_SCREENSHOT_DIR is set, there too."""
    paths = [Path(out_dir) / name]
    if os.environ.get("XIAOLM_SCREENSHOT_DIR"):
        paths.append(Path(os.environ["XIAOLM_SCREENSHOT_DIR"]) / name)
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(path))
    return paths
