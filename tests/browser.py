"""A real headless Chromium driven by Selenium, for the tests of ``qstar report`` pages.

Debian's ``chromium`` and ``chromium-driver`` (``scripts/setup.sh --tests`` installs them when run as root) are
a matched pair; the driver is named explicitly so that Selenium never tries to download one.

Also a command, used for the README's screenshot::

    python -m tests.browser PAGE.html SHOT.png [WIDTH HEIGHT]
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
#: Without these, the closed network refuses Chromium's background connections and it logs errors.
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


def missing() -> str | None:
    """Why no browser can be started here, or None."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if not shutil.which(path):
            return f"{path} is not installed (apt-get install chromium chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[dev]')"
    return None


def start(width: int = 1360, height: int = 1000):
    """A headless Chromium with a fresh profile, collecting the page's console messages."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="qstar-chromium-")
    for flag in (*FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.profile_dir = profile
    return driver


def stop(driver) -> None:
    driver.quit()
    shutil.rmtree(driver.profile_dir, ignore_errors=True)


def screenshot(page: Path, shot: Path, width: int = 1360, height: int = 1000) -> None:
    """The sample browser of a report with one token hovered (the README's picture)."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    driver = start(width, height)
    try:
        driver.get(page.resolve().as_uri())
        driver.execute_script("document.getElementById('samples').scrollIntoView()")
        tokens = driver.find_elements(By.CSS_SELECTOR, ".sample .tok")
        if tokens:
            ActionChains(driver).move_to_element(tokens[min(14, len(tokens) - 1)]).perform()
        driver.save_screenshot(os.fspath(shot))
    finally:
        stop(driver)


if __name__ == "__main__":
    page, shot, *size = sys.argv[1:]
    screenshot(Path(page), Path(shot), *(int(x) for x in size))
