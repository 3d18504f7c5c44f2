"""Debian's chromium for Playwright: Playwright cannot download a browser of its own here."""

from contextlib import contextmanager

EXECUTABLE = "/usr/bin/chromium"
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]


@contextmanager
def chromium():
    """A headless chromium, closed afterwards whatever happens."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=EXECUTABLE, headless=True, args=ARGS)
        try:
            yield browser
        finally:
            browser.close()
