"""The page of serve over plain HTTP: open without the token while nothing else is, its security headers,
its size, that it calls only endpoints the server has, no inline script or style, labelled controls, and
that a non-editable install carries its files. The browser drives it in ``test_page_browser.py``."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
import zipfile
from html.parser import HTMLParser
from pathlib import Path

import pytest
from page_testkit import write_checked_model
from serve_testkit import TOKEN, request, running
from starlette.applications import Starlette
from starlette.routing import Match

from tledge_runtime import Classifier
from tledge_runtime.errors import TledgeError
from tledge_runtime.serve.app import build_app
from tledge_runtime.serve.config import ServeConfig
from tledge_runtime.serve.page import site

AUTH = {"Authorization": f"Bearer {TOKEN}"}
MAX_PAGE_BYTES = 100_000  # the target: the page and all its files together
# What the page asks of the API, and how: a new endpoint in page.js must be added here (and exist in the app).
PAGE_CALLS = {"/info": "GET", "/predict": "POST", "/metrics": "GET"}


@pytest.fixture(scope="module")
def guarded(classifier):
    with running(classifier, token=TOKEN) as srv:
        yield srv


def _text(name: str) -> str:
    return (site.STATIC / name).read_text(encoding="utf-8")


def test_the_page_and_its_files_are_open_with_strict_headers(guarded):
    for path, (name, media_type) in site.ASSETS.items():
        for method in ("GET", "HEAD"):
            status, body, resp = request(guarded, method, path)
            assert status == 200, (method, path, body)
            assert resp.getheader("Content-Type") == media_type
            assert resp.getheader("Content-Security-Policy") == site.CSP
            assert resp.getheader("X-Content-Type-Options") == "nosniff"
            assert resp.getheader("X-Frame-Options") == "DENY"
            assert resp.getheader("Referrer-Policy") == "no-referrer"
            assert len(resp.getheaders()) == len({k.lower() for k, _ in resp.getheaders()})  # no header twice
        assert request(guarded, "GET", path)[1] == (site.STATIC / name).read_bytes()
    directives = dict(d.split(" ", 1) for d in site.CSP.split("; "))
    assert directives["default-src"] == "'none'" and directives["frame-ancestors"] == "'none'"
    assert directives["script-src"] == "'self'" and directives["style-src"] == "'self'"  # no 'unsafe-inline'
    assert directives["connect-src"] == "'self'" and directives["form-action"] == "'none'"
    assert "unsafe" not in site.CSP and "*" not in site.CSP and "http" not in site.CSP


@pytest.mark.parametrize("method,path", [("GET", "/info"), ("GET", "/metrics"), ("POST", "/predict"), ("GET", "/v2"),
                                         ("GET", "/page/other.js"), ("GET", "/page/"), ("GET", "/index.html"),
                                         ("GET", "/page/page.js/x"), ("GET", "/page/../info"), ("GET", "//")])
def test_everything_else_still_needs_the_token(guarded, method, path):
    status, body, resp = request(guarded, method, path, body=b"x" if method == "POST" else None)
    assert status == 401 and body["error"] == "missing bearer token", (path, body)
    assert resp.getheader("X-Content-Type-Options") == "nosniff"


def test_every_answer_says_nosniff_and_page_requests_are_counted_as_page(guarded):
    for method, path, headers in [("GET", "/health", {}), ("GET", "/metrics", AUTH), ("GET", "/nothing", AUTH),
                                  ("POST", "/", {}), ("GET", "/info", {"Authorization": "Bearer wrong"})]:
        status, _, resp = request(guarded, method, path, headers=headers)
        assert resp.getheader("X-Content-Type-Options") == "nosniff", (method, path, status)
    status, body, _ = request(guarded, "POST", "/")
    assert status == 405 and "GET" in body["hint"]
    metrics = request(guarded, "GET", "/metrics", headers=AUTH)[1].decode()
    assert re.search(r'tledge_requests_total\{endpoint="page",status="200"\} [1-9]', metrics)


def test_unchanged_files_revalidate_with_304(guarded):
    etag = request(guarded, "GET", "/page/page.js")[2].getheader("ETag")
    assert re.fullmatch(r'"[0-9a-f]{32}"', etag)
    for sent in (etag, f"W/{etag}", f'"other", {etag}', "*"):
        status, body, resp = request(guarded, "GET", "/page/page.js", headers={"If-None-Match": sent})
        assert status == 304 and body is None and resp.getheader("Content-Security-Policy") == site.CSP
    assert request(guarded, "GET", "/page/page.js", headers={"If-None-Match": '"other"'})[0] == 200
    assert request(guarded, "GET", "/page/page.js", headers={"If-None-Match": "x" * 100_000})[0] == 200


def test_the_page_stays_small():
    sizes = {name: (site.STATIC / name).stat().st_size for name, _ in site.ASSETS.values()}
    assert sum(sizes.values()) <= MAX_PAGE_BYTES, sizes
    assert {p.name for p in site.STATIC.iterdir()} == set(sizes)  # every shipped file is served, and only those


def _inner_app(app):
    while not isinstance(app, Starlette):
        app = app.app  # the middlewares: NoSniff(Observe(Guard(Starlette)))
    return app


def test_the_page_calls_only_endpoints_the_server_has(classifier):
    js = _text("page.js")
    paths = set(re.findall(r"""["'`](/[^"'`\s]*)["'`]""", js))
    assert paths == set(PAGE_CALLS), "page.js names paths the test does not know: add them to PAGE_CALLS"
    assert js.count("fetch(") == 1  # one helper calls the server: the token and the error handling in one place
    app, state = build_app(classifier, ServeConfig(), "m")
    try:
        routes = _inner_app(app).routes
        for path, method in PAGE_CALLS.items():
            scope = {"type": "http", "path": path, "method": method}
            assert any(r.matches(scope)[0] == Match.FULL for r in routes), f"{method} {path} is not a route of serve"
        for path in site.ASSETS:
            assert any(r.matches({"type": "http", "path": path, "method": "GET"})[0] == Match.FULL for r in routes)
    finally:
        state.batcher.close()


class _Tags(HTMLParser):
    """Every start tag with its attributes and the text inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict, list[str]]] = []
        self._open: list[int] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.tags.append((tag, {k: v or "" for k, v in attrs}, []))
        if tag not in ("input", "img", "link", "meta", "br"):  # void elements never close
            self._open.append(len(self.tags) - 1)

    def handle_endtag(self, tag: str) -> None:
        if self._open:
            self._open.pop()

    def handle_data(self, data: str) -> None:
        for i in self._open:
            self.tags[i][2].append(data)


def test_the_html_has_no_inline_script_or_style_and_labels_every_control():
    html = _Tags()
    html.feed(_text("index.html"))
    labelled = {a["for"] for t, a, _ in html.tags if t == "label"}
    controls = 0
    for tag, a, text in html.tags:
        assert not any(k.startswith("on") for k in a) and "style" not in a, (tag, a)
        assert tag != "style" and (tag != "script" or a.get("src") in site.ASSETS), (tag, a)
        for key in ("src", "href"):
            assert key not in a or a[key] in site.ASSETS, f"<{tag} {key}={a[key]!r}> is not a file of the page"
        if tag in ("input", "select", "textarea", "video"):
            controls += 1
            assert a.get("id") in labelled or a.get("aria-label"), f"<{tag} id={a.get('id')!r}> has no label"
        if tag == "button":
            controls += 1
            assert a.get("type") in ("button", "submit") and "".join(text).strip(), f"<button {a}> has no text"
    assert controls >= 7  # token, its two buttons, file, three camera buttons (and the video)
    live = [a for _, a, _ in html.tags if a.get("aria-live")]
    assert [a["id"] for a in live] == ["result"]
    for name in ("page.js", "page.css"):  # nothing from elsewhere: no URL with a host, no CSS import or url()
        assert not re.search(r"https?:|//[a-z0-9]|@import|url\(|innerHTML|outerHTML|insertAdjacentHTML|eval\(",
                             _text(name)), name


def test_info_reports_the_reference_check_that_ran(tmp_path):
    model = write_checked_model(tmp_path / "checked.onnx")
    for check, expected in ((True, True), (False, None)):
        with Classifier(model, device="cpu", check=check) as clf, running(clf) as srv:
            info = request(srv, "GET", "/info")[1]
            assert (info["reference_check"] or {}).get("ok") is expected
            assert len(info["meta"]["reference_set"]["items"]) == 1


def test_a_missing_page_file_stops_the_server_at_start(monkeypatch, tmp_path):
    shutil.copytree(site.STATIC, tmp_path / "static")
    (tmp_path / "static" / "page.js").unlink()
    monkeypatch.setattr(site, "STATIC", tmp_path / "static")
    with pytest.raises(TledgeError) as e:
        site.routes()
    assert "page.js" in e.value.message and "reinstall tledge-runtime" in e.value.hint


@pytest.mark.slow
def test_a_built_wheel_carries_the_page(tmp_path):
    src = tmp_path / "runtime"
    shutil.copytree(Path(site.__file__).parents[3], src,
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "dist"))
    # setuptools at hand: build with it, offline; else (a fresh venv of Python 3.12+ has none) pip fetches it
    offline = ["--no-build-isolation", "--no-index"] if importlib.util.find_spec("setuptools") else []
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", *offline, "-q", "-w",
                           str(tmp_path / "dist"), str(src)], check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    names = zipfile.ZipFile(next((tmp_path / "dist").glob("tledge_runtime-*.whl"))).namelist()
    for name, _ in site.ASSETS.values():
        assert f"tledge_runtime/serve/page/static/{name}" in names
