"""The page in a real headless Chromium, against a real ``serve``: a token entered with the keyboard, a real PNG
uploaded through the file input, label and score read off the page and compared with the API's answer for the
same file; a wrong token's clear message; labels shown as text; the camera snapshot (Chromium's fake camera);
no CSP violation or script error. A screenshot lands in pytest's tmp dir, and where TLEDGE_PAGE_SCREENSHOT
names a path, there too (the README's is made so)."""

from __future__ import annotations

import contextlib
import math
import os
import re
import socket

import pytest
from page_testkit import chromium, wait_for, write_checked_model
from PIL import Image
from runtime_testkit import write_model
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from serve_testkit import TOKEN, request, running

from tledge_runtime import Classifier

AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    with chromium(tmp_path_factory.mktemp("chromium-profile")) as driver:
        yield driver


@pytest.fixture(scope="module")
def checked(tmp_path_factory):
    """A classifier whose reference check ran and passed (what ``serve --check`` loads)."""
    path = write_checked_model(tmp_path_factory.mktemp("page-model") / "colours.onnx")
    with Classifier(path, device="cpu", check=True) as clf:
        yield clf


@contextlib.contextmanager
def _page(driver, classifier, host: str = "127.0.0.1", **overrides):
    """A running server, its page loaded from ``host``; the browser leaves the page before the server stops (a page
    left polling a stopped server would log refused connections into the next test)."""
    with running(classifier, host=host if host == "127.0.0.1" else "0.0.0.0", **overrides) as srv:
        driver.get_log("browser")  # what earlier pages logged is theirs
        origin = f"http://{host}:{srv.port}"
        driver.get(origin + "/")
        try:
            yield srv, origin
        finally:
            driver.get("about:blank")


def _text(driver, element_id: str) -> str:
    return driver.find_element(By.ID, element_id).text


def _visible(driver, element_id: str) -> bool:
    return driver.find_element(By.ID, element_id).is_displayed()


def _problems(driver) -> list[str]:
    """Console entries that mean the page is broken: CSP refusals and script errors (401s are expected)."""
    logs = driver.get_log("browser")
    return [e["message"] for e in logs if e["level"] == "SEVERE" and "status of 401" not in e["message"]]


def _tab_to(driver, element_id: str) -> None:
    """Move the focus with the Tab key alone until ``element_id`` has it: the page works without a mouse."""
    body = driver.find_element(By.TAG_NAME, "body")
    for _ in range(40):
        if driver.switch_to.active_element.get_attribute("id") == element_id:
            return
        (driver.switch_to.active_element if driver.execute_script("return document.activeElement !== document.body")
         else body).send_keys(Keys.TAB)
    raise AssertionError(f"Tab never reached #{element_id}")


def _latency(metrics: str, q: float) -> str:
    """The q-quantile of /predict's latency histogram as the page shows it: linear within the bucket."""
    buckets: dict[float, float] = {}
    for le, n in re.findall(r'tledge_request_seconds_bucket\{endpoint="(?:predict|infer)",le="([^"]+)"\} (\S+)', metrics):
        buckets[float(le)] = buckets.get(float(le), 0.0) + float(n)
    items = sorted(buckets.items())
    rank, lower, below = q * items[-1][1], 0.0, 0.0
    for le, n in items:
        if n >= rank:
            assert le != math.inf, "the test's requests took longer than the top bucket"
            ms = (lower + ((le - lower) * (rank - below)) / max(n - below, 1e-12)) * 1000
            return f"{ms:.2f} ms" if ms < 10 else f"{ms:.1f} ms"
        lower, below = le, n
    raise AssertionError("no request in the histogram")


def _screenshot(driver, tmp_path) -> None:
    shot = tmp_path / "page.png"
    size = driver.get_window_size()
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(size["width"], height + size["height"] - driver.execute_script("return innerHeight"))
    driver.save_screenshot(str(shot))  # the whole page: the window as tall as the document
    driver.set_window_size(size["width"], size["height"])
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("TLEDGE_PAGE_SCREENSHOT"):  # a palette PNG: a flat page in a fraction of the bytes
        Image.open(shot).convert("RGB").quantize(256).save(os.environ["TLEDGE_PAGE_SCREENSHOT"], optimize=True)


def test_the_page_shows_what_the_api_answers(browser, checked, images, tmp_path):
    png = images["red"][2]
    with _page(browser, checked, token=TOKEN, max_bytes=1 << 20) as (srv, origin):
        wait_for("the token request", lambda: "needs a token" in _text(browser, "auth-msg"))
        _tab_to(browser, "token")
        browser.switch_to.active_element.send_keys(TOKEN + Keys.ENTER)
        wait_for("the model card", lambda: "passed when serve started" in _text(browser, "card-list"))
        card = _text(browser, "card-list")
        assert "colours.onnx" in card and "red, green, blue" in card and "tiny-gap-gemm" in card and "fp32" in card
        assert browser.execute_script("return sessionStorage.getItem('tledge-token')") == TOKEN

        browser.find_element(By.ID, "file").send_keys(str(png))
        wait_for("the answer", lambda: "answered in" in _text(browser, "status"))
        status, api, _ = request(srv, "POST", "/predict", png.read_bytes(), headers=AUTH)
        assert status == 200
        assert _text(browser, "label") == api["label"] == "red"
        assert _text(browser, "score") == f"{api['score'] * 100:.2f}%"
        rows = browser.find_elements(By.CSS_SELECTOR, "#topk li")
        assert [r.find_element(By.CLASS_NAME, "name").text for r in rows] == [t["label"] for t in api["topk"]]
        bars = browser.execute_script("return [...document.querySelectorAll('#topk .track')].map("
                                      "t => t.firstChild.getBoundingClientRect().width / t.clientWidth)")
        assert bars == pytest.approx([t["score"] for t in api["topk"]], abs=0.01)  # each bar as long as its score

        # Two answers (the page's and the test's), then a quiet refresh: the page's latency is the whole histogram's,
        # which the test computes from the same /metrics the same way (Prometheus' histogram_quantile).
        wait_for("the live figures", lambda: _text(browser, "answered") == "2"
                 and _text(browser, "live-scope") == "from the server's first request", timeout_s=20)
        metrics = request(srv, "GET", "/metrics", headers=AUTH)[1].decode()
        assert (_text(browser, "p50"), _text(browser, "p99")) == (_latency(metrics, 0.5), _latency(metrics, 0.99))
        assert _text(browser, "unknown-rate") == "not reported by this server"
        _screenshot(browser, tmp_path)
        urls = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        assert urls and all(u.startswith(origin + "/") and TOKEN not in u for u in urls), urls
        assert TOKEN not in browser.current_url

        token = browser.find_element(By.ID, "token")
        token.clear()
        token.send_keys("not-the-token-0123456789" + Keys.ENTER)
        wait_for("the refusal", lambda: "The token was refused" in _text(browser, "auth-msg"))
        assert _text(browser, "conn") == "Not connected: a token is needed."
        assert browser.execute_script("return sessionStorage.getItem('tledge-token')") is None
        browser.find_element(By.ID, "file").send_keys(str(png))
        wait_for("the refusal of the image", lambda: "The token was refused" in _text(browser, "error"))
        assert _problems(browser) == []


def test_labels_are_shown_as_text_and_the_camera_snapshot_is_answered(browser, tmp_path, images):
    labels = ('red <img src=x id="injected">', "green & <b>bold</b>", "blue")
    path = write_model(tmp_path / "hostile.onnx", labels=labels)
    with Classifier(path, device="cpu") as clf, _page(browser, clf, max_bytes=1 << 20):
        wait_for("the model card", lambda: "hostile.onnx" in _text(browser, "card-list"))
        assert not _visible(browser, "auth")  # a server without a token asks for none
        assert "not run by this server" not in _text(browser, "card-list")
        assert "the model carries no reference set" in _text(browser, "card-list")

        browser.find_element(By.ID, "file").send_keys(str(images["red"][0]))
        wait_for("the answer", lambda: _text(browser, "label") == labels[0])
        assert labels[1] in [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#topk .name")]
        assert browser.find_elements(By.ID, "injected") == [] and browser.find_elements(By.CSS_SELECTOR, "#topk b") == []

        assert "Or take a snapshot" in _text(browser, "camera-note")  # 127.0.0.1 is a secure context
        browser.find_element(By.ID, "camera-start").click()
        snap = browser.find_element(By.ID, "camera-snap")
        wait_for("the camera", lambda: snap.is_enabled() and browser.execute_script(
            "return document.getElementById('video').videoWidth > 0"))
        snap.click()
        wait_for("the snapshot's answer", lambda: _text(browser, "status").startswith("camera snapshot · answered"))
        assert _text(browser, "label") in labels and _text(browser, "score").endswith("%")
        browser.find_element(By.ID, "camera-stop").click()
        assert not _visible(browser, "video")
        assert _problems(browser) == []


def _lan_address() -> str | None:
    """This machine's address on its network (no packet is sent: a UDP connect only picks a route)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # TEST-NET-1: never routed anywhere
            address = s.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


def test_over_plain_http_off_loopback_the_camera_says_why_it_is_off(browser, classifier):
    address = _lan_address()
    if address is None:
        pytest.skip("this machine has no network address besides loopback to reach the page as a remote browser")
    with _page(browser, classifier, host=address, token=TOKEN):
        wait_for("the token request", lambda: "needs a token" in _text(browser, "auth-msg"))
        note = _text(browser, "camera-note")
        assert "HTTPS or on localhost" in note and "--ssl-certfile" in note
        assert not _visible(browser, "camera-start")
        assert _problems(browser) == []


def test_a_signed_model_with_answers_shows_its_set_unknown_and_signature(browser, tmp_path, images):
    """A real `serve --model-dir` with a signed version of a model that carries prediction sets and "unknown": the
    page shows the version, the verified key, and for each image the set and the unknown verdict the API gives for
    the same file; the unknown rate is the one /metrics counts."""
    import os as _os

    from fleet_testkit import checked_model, make_key, sign
    from runtime_testkit import answers_of_colour_model

    from tledge_runtime.repository import ModelRepository

    private, public = make_key(tmp_path / "keys")
    staging = tmp_path / "models" / "colour" / ".staging"
    staging.mkdir(parents=True)
    checked_model(staging / "model.onnx", answers=answers_of_colour_model(set_threshold=0.9))
    sign(staging, private)
    _os.rename(staging, tmp_path / "models" / "colour" / "1")
    grey = tmp_path / "grey.png"
    Image.new("RGB", (32, 32), (128, 128, 128)).save(grey)
    repo = ModelRepository(tmp_path / "models", trusted_keys=[public], device="cpu", settle_s=0.0, warmup_batch=2)
    try:
        with running(repo, poll_s=0.1) as srv:
            wait_for("version 1 to pass its checks", lambda: request(srv, "GET", "/info")[0] == 200, timeout_s=30)
            info = request(srv, "GET", "/info")[1]
            browser.get_log("browser")
            browser.get(f"http://127.0.0.1:{srv.port}/")
            try:
                wait_for("the model card", lambda: "Signature" in _text(browser, "card-list"))
                card = _text(browser, "card-list")
                assert f"Version\n{info['version']}" in card
                assert f"Signature\nverified ({info['signature']['key']})" in card
                for path, unknown in ((images["red"][2], False), (grey, True)):
                    browser.find_element(By.ID, "file").send_keys(str(path))
                    wait_for("the answer", lambda: "answered in" in _text(browser, "status"))
                    api = request(srv, "POST", "/predict", path.read_bytes())[1]
                    assert api["unknown"] is unknown and _text(browser, "label") == api["label"]
                    verdict = _text(browser, "unknown")
                    assert verdict.startswith("Unknown: " if unknown else "Known: ")
                    assert f"out-of-distribution score {api['ood_score']:.3f}" in verdict
                    shown = [li.find_element(By.CLASS_NAME, "name").text
                             for li in browser.find_elements(By.CSS_SELECTOR, "#topk li.in-set")]
                    assert shown == api["candidates"]
                    if unknown:  # a grey frame: every colour is about as likely, all three in the set
                        assert len(api["candidates"]) == 3
                        assert _text(browser, "set") == f"Prediction set: {', '.join(api['candidates'])}: unsure, " \
                                                        "route to a person"
                    browser.execute_script("document.getElementById('status').textContent = ''")
                metrics = request(srv, "GET", "/metrics")[1].decode()
                unknown_n = sum(float(v) for v in re.findall(r'^tledge_unknown_total\{[^}]*\} (\S+)$', metrics, re.M))
                assert unknown_n == 2  # the grey frame, from the page and from the test
                wait_for("the unknown rate", lambda: _text(browser, "unknown-rate") == "50.0%", timeout_s=20)
                assert _problems(browser) == []
            finally:
                browser.get("about:blank")
    finally:
        repo.close()
