"""Helpers of the page tests: a model that carries a reference set, and a real headless Chromium.

The reference set is made the way ``tledge export`` makes one (runtime code only, no torch): a picture re-encoded
by :func:`encode_reference_image`, fingerprinted by :func:`trace`, with the logits the test graph computes
(the mean normalized value of each channel: a global average pool and an identity Gemm).
"""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from runtime_testkit import colour_image, make_meta, write_model

from tledge_runtime.check.trace import encode_reference_image, trace
from tledge_runtime.model.reference_set import ReferenceItem, ReferenceSet

# Debian's packages `chromium` and `chromium-driver` (what .ci/run installs); TLEDGE_CHROMIUM/TLEDGE_CHROMEDRIVER
# name others. Never a browser a tool downloads by itself: build machines are offline.
CHROMIUM = [os.environ.get("TLEDGE_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
            shutil.which("chromium-browser")]
CHROMEDRIVER = [os.environ.get("TLEDGE_CHROMEDRIVER"), "/usr/bin/chromedriver", shutil.which("chromedriver")]
# Headless, and quiet on a closed network: no background downloads, updates, sync or QUIC probes that would
# flood refused connections. A fake camera (a moving test pattern) lets the camera snapshot run for real.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1280,1000", "--use-fake-ui-for-media-stream",
                 "--use-fake-device-for-media-stream"]


def write_checked_model(path: Path, **meta_kwargs: Any) -> Path:
    """The colour model with a one-image reference set, so ``Classifier(check=True)`` runs the check."""
    meta = make_meta(**meta_kwargs)
    encoded = encode_reference_image(colour_image("green", seed=99, size=(48, 40)), meta.preprocess, 90)
    traced = trace(encoded, meta.preprocess)
    logits = traced.tensor.mean(axis=(2, 3))[0]  # what the graph computes on this tensor
    item = ReferenceItem(tuple(float(v) for v in logits), traced.fingerprint,
                         image=base64.b64encode(encoded).decode("ascii"))
    return write_model(path, meta=meta.with_(reference_set=ReferenceSet((item,))))


def _first(candidates: list[str | None]) -> str | None:
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


@contextlib.contextmanager
def chromium(profile: Path) -> Iterator[Any]:
    """A Selenium driver of the system's headless Chromium; skips (saying why) where none is installed."""
    browser, driver_path = _first(CHROMIUM), _first(CHROMEDRIVER)
    if browser is None or driver_path is None:
        pytest.skip("no Chromium and chromedriver here (Debian: apt-get install chromium chromium-driver; or set "
                    "TLEDGE_CHROMIUM and TLEDGE_CHROMEDRIVER): the page's browser tests need a real browser")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in [*CHROMIUM_ARGS, f"--user-data-dir={profile}"]:
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        driver.set_page_load_timeout(30)
        yield driver
    finally:
        driver.quit()


def wait_for(what: str, condition: Callable[[], Any], timeout_s: float = 15.0) -> Any:
    """``condition()``'s first truthy value, polled; a clear failure naming ``what`` after ``timeout_s``."""
    end = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.05)
