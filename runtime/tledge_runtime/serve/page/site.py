"""The page's routes: ``GET /`` and its few files, read from the package once and answered from memory.

They are served without the token: they hold nothing secret, and everything the page shows it fetches from
the token-protected endpoints (``/info``, ``/predict``, ``/metrics``) with the token the visitor enters.
The headers keep the page to its own origin: a Content-Security-Policy that loads script, style, images and
requests from this server only (no inline script or style, so injected markup cannot run), no framing
(clickjacking), no form posts or ``<base>`` rewrites, no referrer, no MIME sniffing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from pathlib import Path

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tledge_runtime.errors import TledgeError

STATIC = Path(__file__).parent / "static"
# URL path -> (file in STATIC, media type). Only these paths are open without the token.
ASSETS = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/page/page.js": ("page.js", "text/javascript; charset=utf-8"),
    "/page/page.css": ("page.css", "text/css; charset=utf-8"),
    "/page/icon.svg": ("icon.svg", "image/svg+xml"),
}
PATHS = frozenset(ASSETS)

CSP = "; ".join([
    "default-src 'none'",  # anything not named below is refused
    "script-src 'self'",  # page.js only: no inline script, no eval
    "style-src 'self'",  # page.css only; CSSOM writes from page.js (bar widths) are not inline styles
    "img-src 'self' blob:",  # the icon, and the chosen photo or snapshot previewed from a blob: URL
    "media-src 'none'",  # the camera preview is a MediaStream (srcObject), which media-src does not govern
    "connect-src 'self'",  # fetch() to this server's /info, /predict and /metrics only
    "frame-ancestors 'none'",  # nobody may frame the page (clickjacking); X-Frame-Options for older browsers
    "base-uri 'none'",
    "form-action 'none'",  # the token form is handled by the script, never submitted
])
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Permissions-Policy": "camera=(self), microphone=(), geolocation=(), payment=(), usb=()",
    "Cross-Origin-Resource-Policy": "same-origin",  # other sites cannot embed the files
    # No Cross-Origin-Opener-Policy: browsers ignore it on plain HTTP off loopback (most devices) and say so in
    # the console; the page opens no windows, and frame-ancestors already keeps it out of other pages.
    "Cache-Control": "no-cache",  # revalidate (cheap, ETag): an upgraded runtime's page shows at once
}


def routes() -> list[Route]:
    """One GET route per file of the page; the files are read now, so a broken install fails at start."""
    return [Route(path, _asset(*_read(name), media_type), methods=["GET"])
            for path, (name, media_type) in ASSETS.items()]


def _read(name: str) -> tuple[bytes, str]:
    path = STATIC / name
    try:
        body = path.read_bytes()
    except OSError as e:
        raise TledgeError(f"the page's file {path} cannot be read ({e.strerror or e})",
                          hint="reinstall tledge-runtime: its package data is missing") from None
    return body, '"' + hashlib.sha256(body).hexdigest()[:32] + '"'


def _asset(body: bytes, etag: str, media_type: str) -> Callable[[Request], Awaitable[Response]]:
    headers = {**HEADERS, "ETag": etag}

    async def serve(request: Request) -> Response:
        if _matches(request.headers.get("if-none-match", ""), etag):
            return Response(status_code=304, headers=headers)
        return Response(body, media_type=media_type, headers=headers)

    return serve


def _matches(if_none_match: str, etag: str) -> bool:
    """RFC 9110 §13.1.2: a list of entity tags (weak ones compare equal too), or ``*``."""
    tags = [t.strip() for t in if_none_match[:1024].split(",")]  # bounded: the header is the client's
    return "*" in tags or any(t.removeprefix("W/") == etag for t in tags)
