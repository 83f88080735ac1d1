"""A real headless browser for the dashboard's tests: Debian's chromium driven by its chromedriver
through selenium (never a browser a package downloads; .ci/run installs both)."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
# Without the background-networking flags chromium keeps dialling out, which this machine refuses.
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars")


def chrome(width: int = 1400, height: int = 1600):
    """A new headless chromium (quit it when done); the test is skipped where chromium is missing."""
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip("chromium and chromedriver are not installed (.ci/run installs Debian's)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for f in FLAGS:
        opts.add_argument(f)
    opts.add_argument(f"--window-size={width},{height}")
    opts.add_argument("--user-data-dir=" + tempfile.mkdtemp(prefix="duet-chromium-"))
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


def wait_for(fn, timeout: float = 60, interval: float = 0.2, what: str = "condition"):
    """Poll ``fn`` until it returns something truthy; that value, or AssertionError naming ``what``."""
    import time

    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        try:
            last = fn()
        except Exception as exc:  # the page may be between renders
            last = exc
        if last and not isinstance(last, Exception):
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


def js_errors(driver) -> list[str]:
    """Severe console messages of the page (favicon 404s aside)."""
    return [m["message"] for m in driver.get_log("browser")
            if m["level"] == "SEVERE" and "favicon.ico" not in m["message"]]
