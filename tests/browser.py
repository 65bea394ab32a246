"""Headless Chromium for the tests that look at a page as a browser renders it (the ranking
report, the documentation site). Debian's package; CI installs it (.ci/run), so under CI=true
a missing browser fails the test instead of skipping it."""

from __future__ import annotations

import os
import shutil

import pytest

# Quiet, offline and reproducible: no GPU, no network services, no first-run pages.
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium() -> str:
    """The browser's path; skips the test where it is missing, fails it under CI=true."""
    browser = next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser")) if p), None)
    if browser is None:
        message = "chromium is not installed (apt-get install -y chromium)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message}: CI must install it")
        pytest.skip(message)
    return browser
