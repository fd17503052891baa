"""Headless Chromium for the page tests: the system's browser, driven through selenium.

The browser and its driver are Debian's ``chromium`` and ``chromium-driver``; nothing
downloads a browser. Where they are missing, :func:`system_chromium` installs them
with apt-get, and skips the test only where apt-get is not there to do it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import REPO_ROOT

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.chrome.service import Service  # noqa: E402

PACKAGES = ("chromium", "chromium-driver")
#: Chromium resolves no host name but the loopback's: the page gets nothing from outside.
OFFLINE = "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1, EXCLUDE localhost"


def artifacts_dir() -> Path:
    """Where the tests' screenshots go: ``test-artifacts/`` at the repository's root, or ``$LMSERVE_TEST_ARTIFACTS``."""
    directory = Path(os.environ.get("LMSERVE_TEST_ARTIFACTS") or REPO_ROOT / "test-artifacts")
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def system_chromium() -> tuple[str, str]:
    """The paths of Chromium and its driver, installed with apt-get first where they are missing."""
    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if browser and driver:
        return browser, driver
    if shutil.which("apt-get") is None:
        pytest.skip("headless Chromium is not installed and there is no apt-get to install it "
                    f"(Debian packages: {' '.join(PACKAGES)})")
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run([*sudo, "apt-get", "update", "-qq"], env=env, check=True, timeout=600)
    subprocess.run([*sudo, "apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES], env=env,
                   check=True, timeout=900, stdout=subprocess.DEVNULL)
    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    assert browser and driver, f"apt-get installed {PACKAGES} but chromium or chromedriver is not on PATH"
    return browser, driver


def start_chromium(offline: bool = False):
    """A headless Chromium session (``offline``: no host but the loopback resolves); quit it when done."""
    binary, driver_path = system_chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    arguments = ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,1000"]
    for argument in arguments + ([OFFLINE] if offline else []):
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(driver_path), options=options)
