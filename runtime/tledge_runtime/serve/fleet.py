"""``serve --model-dir``: the server's model kept current from a :class:`~tledge_runtime.repository.ModelRepository`.

The repository decides which version serves (signature, load, reference check, warm-up; rollback
protection); this module turns its decision into the server's :class:`~tledge_runtime.serve.live.Live`,
polls the folder every ``--poll`` seconds in a thread of its own (loading never blocks the event
loop), counts swaps and refusals in ``/metrics``, and answers the Open Inference Protocol's model
repository extension, token-protected like every other non-health path:

    GET|POST /v2/repository/index                     every version: READY, or UNAVAILABLE with the reason
    POST     /v2/repository/models/<name>/load        refresh now; 200 once a version serves, else 400 + reasons
    POST     /v2/repository/models/<name>/unload      stop serving (requests in flight finish)
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import TYPE_CHECKING, Any

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tledge_runtime.errors import TledgeError
from tledge_runtime.serve.http import HTTPError, content_length, read_body
from tledge_runtime.serve.live import Live, swap
from tledge_runtime.serve.served_model import IMAGE_SUFFIX

if TYPE_CHECKING:
    from tledge_runtime.repository.repository import Event, Loaded, ModelRepository

log = logging.getLogger("tledge_runtime")

MAX_REQUEST_BYTES = 64 << 10  # a repository request's JSON body (Triton's index takes {"ready": true})


class Fleet:
    """The bridge between a model repository and a running server."""

    def __init__(self, repository: ModelRepository, poll_s: float | None = None):
        self.repository, self.poll_s = repository, poll_s
        self.state: Any = None
        self._installed: Loaded | None = None
        self._lock = threading.Lock()  # one refresh/load/unload at a time
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_error = ""

    def attach(self, state: Any) -> None:
        """Serve the repository's current version through ``state`` (called by ``build_app``)."""
        self.state = state
        with self._lock:
            self._install()

    def start(self) -> None:
        if self.poll_s is not None and self._thread is None:
            self._thread = threading.Thread(target=self._poll, name="tledge-poll", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def refresh(self) -> list[Event]:
        with self._lock:
            events = self.repository.refresh()
            self._record(events)
            self._install()
        return events

    def load(self) -> None:
        with self._lock:
            try:
                self.repository.load()
            finally:
                self._install()

    def unload(self) -> None:
        with self._lock:
            self.repository.unload()
            self._install()

    def routes(self) -> list[Route]:
        return [Route("/v2/repository/index", self._index, methods=["GET", "POST"]),
                Route("/v2/repository/models/{model}/load", self._load, methods=["POST"]),
                Route("/v2/repository/models/{model}/unload", self._unload, methods=["POST"])]

    # ------------------------------------------------------------------ the swap

    def _install(self) -> None:
        """Make the server's Live match the repository's current version (the lock is held)."""
        loaded = self.repository.acquire()  # one count for the Live, released when the Live closes
        if loaded is not None and loaded is self._installed:
            loaded.release()
            return
        if loaded is None and self._installed is None:
            return
        s = self.state
        new = None if loaded is None else Live(loaded.classifier, str(loaded.version), loaded.signature_status, s.name,
                                               s.config.max_batch, s.metrics, on_close=loaded.release)
        self._installed = loaded
        swap(s, new)

    def _record(self, events: list[Event]) -> None:
        m = self.state.metrics
        for e in events:
            if e.kind == "swap":
                m.swaps.inc()
            else:
                m.versions_refused.labels(e.kind).inc()

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.refresh()
                self._last_error = ""
            except TledgeError as e:  # the folder vanished or became unreadable: say so once, keep serving
                if str(e) != self._last_error:
                    log.warning("model repository: %s", e)
                    self._last_error = str(e)
            except Exception:
                log.exception("model repository: polling failed")
                time.sleep(self.poll_s or 1.0)

    # ------------------------------------------------------------------ the repository extension

    async def _index(self, request: Request) -> Response:
        body = await _small_body(request)
        ready_only = bool(body.get("ready")) if isinstance(body, dict) else False
        states = await anyio.to_thread.run_sync(self.repository.index)
        return JSONResponse([v.to_dict() for v in states if v.state == "READY" or not ready_only])

    async def _load(self, request: Request) -> Response:
        self._named(request)
        await _small_body(request)  # Triton's config overrides and file uploads are not taken: versions come from disk
        try:
            await anyio.to_thread.run_sync(self.load)
        except TledgeError as e:
            raise HTTPError(400, e.message, e.hint) from None
        return JSONResponse({})

    async def _unload(self, request: Request) -> Response:
        self._named(request)
        await _small_body(request)
        await anyio.to_thread.run_sync(self.unload)
        return JSONResponse({})

    def _named(self, request: Request) -> None:
        name = request.path_params["model"]
        if name not in (self.state.name, self.state.name + IMAGE_SUFFIX):
            raise HTTPError(404, f"no model named {name!r} in this repository",
                            f"this server serves {self.state.name} (and {self.state.name}{IMAGE_SUFFIX})")


async def _small_body(request: Request) -> Any:
    """A repository request's optional JSON body, bounded before it is read."""
    declared = content_length(request)
    if declared is not None and declared > MAX_REQUEST_BYTES:
        raise HTTPError(413, f"request body is {declared} bytes, more than the {MAX_REQUEST_BYTES} allowed here",
                        "repository requests take a small JSON object or nothing", {"Connection": "close"})
    raw = await read_body(request, MAX_REQUEST_BYTES, time.monotonic() + 10.0, declared)
    if not raw.strip():
        return {}
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        raise HTTPError(400, "the request body is not JSON", "send a JSON object, or no body") from None
