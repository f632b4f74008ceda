"""The ASGI application of ``tledge-runtime serve`` (starlette): routes, admission, bodies, answers.

Order of work for a request, cheapest refusal first:
1. the token (:class:`Guard`, before routing: an unknown path without the token is a 401, not a map);
2. the model name and the declared body size;
3. admission: a slot among ``max_queue`` and the body's bytes within ``body_memory`` - both before
   a byte of the body is read, so overload costs neither memory nor decoding;
4. the body, read against the size limit while it streams and against the request's deadline
   (:mod:`tledge_runtime.serve.http`, which also turns every error into JSON);
5. decoding in a bounded pool of threads, then the batcher; a client that disconnects or a
   deadline that passes while waiting withdraws the job before the model runs it.
Every answer is JSON (or OIP binary tensors) with a status code, errors included.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

import anyio
import numpy as np
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tledge_runtime import __version__
from tledge_runtime.answers.capture import Capture
from tledge_runtime.errors import ImageError, TledgeError
from tledge_runtime.serve import oip
from tledge_runtime.serve import served_model as sm
from tledge_runtime.serve.batch import IMAGES, TENSOR, Batcher
from tledge_runtime.serve.http import (
    Guard,
    HTTPError,
    NoSniff,
    Observe,
    content_length,
    discard_rest,
    disconnected,
    http_exception,
    late,
    read_body,
    tledge_error,
    too_large,
    unexpected,
)
from tledge_runtime.serve.live import Live
from tledge_runtime.serve.metrics import Metrics
from tledge_runtime.serve.page import site as page
from tledge_runtime.serve.served_model import Served

if TYPE_CHECKING:
    from tledge_runtime.classifier import Classifier
    from tledge_runtime.serve.config import ServeConfig
    from tledge_runtime.serve.fleet import Fleet


@dataclass
class State:
    """What every handler shares: the version serving, the limits, the counters.

    ``live`` is replaced whole when a new version is swapped in (:func:`tledge_runtime.serve.live.swap`);
    a request uses the one it entered at admission until it is answered.
    """

    config: ServeConfig
    name: str
    metrics: Metrics
    limiter: anyio.CapacityLimiter  # threads decoding images / parsing JSON at once: bounds their memory
    live: Live | None = None  # None: nothing serves (no version passed yet, or unloaded)
    capture: Capture | None = None  # --capture: inputs answered unknown or unsure are kept here
    fleet: Fleet | None = None  # serve --model-dir: the repository behind ``live``
    started: float = field(default_factory=time.monotonic)
    in_flight: int = 0
    body_bytes: int = 0

    @property
    def classifier(self) -> Classifier | None:
        return self.live.classifier if self.live is not None else None

    @property
    def batcher(self) -> Batcher | None:
        return self.live.batcher if self.live is not None else None


def build_app(classifier: Classifier | None, config: ServeConfig, name: str, fleet: Fleet | None = None,
              ) -> tuple[Any, State]:
    """The ASGI app serving ``classifier`` (or the versions of ``fleet``) as ``name`` and ``name_image``; returns it
    and its shared state."""
    metrics = Metrics({"name": name, "version": __version__})
    state = State(config, name, metrics, anyio.CapacityLimiter(config.workers), fleet=fleet,
                  capture=Capture(config.capture) if config.capture is not None else None)
    if classifier is not None:
        from tledge_runtime.repository.signature import signature_status
        from tledge_runtime.serve.live import swap

        signature = signature_status(classifier.path.parent, getattr(classifier, "signature", None))
        swap(state, Live(classifier, "1", signature, name, config.max_batch, metrics))
    if fleet is not None:
        fleet.attach(state)
    h = _Handlers(state)
    prefixes = ["/v2/models/{model}", "/v2/models/{model}/versions/{version}"]
    routes = [Route("/v2", h.server_metadata), Route("/v2/health/live", h.live), Route("/v2/health/ready", h.ready)]
    for prefix in prefixes:
        routes += [Route(prefix, h.model_metadata), Route(prefix + "/ready", h.model_ready),
                   Route(prefix + "/infer", h.infer, methods=["POST"])]
    routes += [Route("/predict", h.predict, methods=["POST"]), Route("/health", h.health), Route("/info", h.info),
               Route("/metrics", h.metrics)]
    routes += page.routes()  # GET / and the page's files, open without the token (nothing secret in them)
    if fleet is not None:  # the Open Inference Protocol's model repository extension
        routes += fleet.routes()
    handlers = {HTTPException: http_exception, TledgeError: tledge_error, Exception: unexpected}
    app = Starlette(routes=routes, exception_handlers=handlers)
    return NoSniff(Observe(Guard(app, config.token, open_paths=page.PATHS), metrics)), state


# ----------------------------------------------------------------------------- handlers


class _Handlers:
    def __init__(self, state: State):
        self.s = state

    # --- open: liveness and readiness

    async def live(self, request: Request) -> Response:
        return JSONResponse({"live": True})

    async def ready(self, request: Request) -> Response:
        live = self.s.live
        ok = live is not None and live.batcher.alive
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    async def model_ready(self, request: Request) -> Response:
        live = self._current()
        model = self._model(request, live, reveal=self.s.config.token is None)  # open path: names to the trusted only
        ok = live.batcher.alive
        return JSONResponse({"name": model.name, "ready": ok}, status_code=200 if ok else 503)

    async def health(self, request: Request) -> Response:
        live = self.s.live
        return JSONResponse({"status": "ok" if live is not None else "no model loaded",
                             "backend": live.classifier.backend_name if live is not None else None,
                             "model_version": live.version if live is not None else None,
                             "in_flight": self.s.in_flight, "uptime_s": round(time.monotonic() - self.s.started, 1)})

    # --- metadata (token)

    async def server_metadata(self, request: Request) -> Response:
        return JSONResponse({"name": "tledge-runtime", "version": __version__,
                             "extensions": ["binary_tensor_data", "classification"]})

    async def model_metadata(self, request: Request) -> Response:
        live = self._current()
        return JSONResponse(self._model(request, live).metadata())

    async def info(self, request: Request) -> Response:
        live, cfg = self._current(), self.s.config
        clf = live.classifier
        return JSONResponse({"model": clf.path.name, "names": list(live.models), "backend": clf.backend_name,
                             "version": live.version, "signature": live.signature, "labels": list(clf.labels),
                             "limits": {"max_bytes": cfg.max_bytes, "max_queue": cfg.max_queue,
                                        "timeout_s": cfg.timeout_s},
                             "meta": clf.meta.to_dict(),
                             # the reference check on this backend if one ran (serve --check); the page shows it
                             "reference_check": None if clf.check_report is None else clf.check_report.to_dict()})

    async def metrics(self, request: Request) -> Response:
        body, content_type = self.s.metrics.render()
        return Response(body, media_type=content_type)

    # --- inference (token, admission)

    async def predict(self, request: Request) -> Response:
        if request.headers.get("content-type", "").startswith("multipart/"):
            raise HTTPError(415, "multipart bodies are not accepted", "POST the image file's bytes as the request body")
        k = self._topk(request, self._current())
        return await self._admitted(request, lambda live, body, deadline: self._predict(request, live, body, k,
                                                                                        deadline))

    async def infer(self, request: Request) -> Response:
        self._model(request, self._current())  # an unknown name or version: refused before admission
        return await self._admitted(request, lambda live, body, deadline: self._infer(
            request, live, self._model(request, live), body, deadline))

    async def _predict(self, request: Request, live: Live, body: bytearray, k: int, deadline: float) -> Response:
        if not body:
            raise HTTPError(400, "empty request body", "POST the image file's bytes")
        start = time.perf_counter()
        clf = live.classifier
        image = await self._in_thread(_prepare_one, clf, body)
        probs, scores = await self._run(request, live, IMAGES, image[None], deadline)
        top = clf.rank(probs[0], min(k, len(clf.labels)))
        answer = clf.answerer.predictions(probs, scores)[0]
        await self._answered(live, [body], [answer], probs)
        return JSONResponse({**answer.to_dict(), "topk": [p.to_dict() for p in top],
                             "model_version": live.version,
                             "latency_ms": round((time.perf_counter() - start) * 1000.0, 3)})

    async def _infer(self, request: Request, live: Live, model: Served, body: bytearray, deadline: float) -> Response:
        req = await self._in_thread(oip.parse_infer_request, body, request.headers.get(oip.HEADER_LENGTH))
        specs = {o.name: o for o in model.outputs}
        for o in req.outputs or ():  # checked before any decoding or model time is spent
            if o.name not in specs:
                raise HTTPError(400, f"model {model.name!r} has no output {o.name!r}", f"ask for {', '.join(specs)}")
            if o.classification and not specs[o.name].labelled:
                raise HTTPError(400, f"output {o.name!r} has no labels to classify with",
                                f"ask for classification on {', '.join(s.name for s in model.outputs if s.labelled)}")
        x = _one_input(req, model)
        if model.image:
            clf = live.classifier
            images = await self._in_thread(sm.prepare_images, clf, x.array)
            probs, scores = await self._run(request, live, IMAGES, images, deadline)
            answers = clf.answerer.predictions(probs, scores)
            await self._answered(live, [bytes(row[0]) for row in x.array.reshape(len(x.array), -1)], answers, probs)
            results = sm.image_results(probs, answers)
        else:
            spec = model.outputs[0]
            out, scores = await self._run(request, live, TENSOR, x.array, deadline)
            results = {spec.name: out.astype(oip.NUMPY_TYPES[spec.datatype])}
            if scores is not None and len(model.outputs) > 1:
                results[model.outputs[1].name] = scores.astype(np.float32)[:, None]
        return self._oip_response(live, model, req, results)

    def _oip_response(self, live: Live, model: Served, req: oip.InferRequest,
                      results: dict[str, np.ndarray]) -> Response:
        specs = {o.name: o for o in model.outputs}
        wanted = req.outputs if req.outputs is not None else [oip.RequestedOutput(n, None, 0) for n in results]
        tensors = []
        for o in wanted:
            spec, values = specs[o.name], results[o.name]
            if o.classification:
                values = oip.classification(values, live.classifier.labels, o.classification)
                tensors.append(oip.Tensor(o.name, "BYTES", values))
            else:
                tensors.append(oip.Tensor(o.name, spec.datatype, values))
        body, header_length = oip.encode_infer_response(model.name, req, tensors, version=live.version)
        if header_length is None:
            return Response(body, media_type="application/json")
        return Response(body, media_type="application/octet-stream",
                        headers={oip.HEADER_LENGTH: str(header_length)})

    # --- the shared path of every inference request

    async def _admitted(self, request: Request,
                        handle: Callable[[Live, bytearray, float], Awaitable[Response]]) -> Response:
        s, cfg = self.s, self.s.config
        deadline = time.monotonic() + cfg.timeout_s
        declared = content_length(request)
        if declared is not None and declared > cfg.max_bytes:
            if request.headers.get("expect", "").lower() != "100-continue":  # else the client waits: it sent nothing
                await discard_rest(request, deadline)  # (and reading now would invite it to send the body)
            raise too_large(declared, cfg.max_bytes)
        reserve = declared if declared is not None else cfg.max_bytes
        if s.in_flight >= cfg.max_queue:
            s.metrics.refused.labels("queue").inc()
            raise HTTPError(503, f"server busy: {cfg.max_queue} requests already in flight", "retry shortly",
                            {"Retry-After": "1"})
        if s.body_bytes + reserve > cfg.body_memory:
            s.metrics.refused.labels("memory").inc()
            raise HTTPError(503, f"server busy: {s.body_bytes} bytes of request bodies held, the budget is "
                                 f"{cfg.body_memory}", "retry shortly", {"Retry-After": "1"})
        live = self._enter()  # the version this request is served by, start to end, even if another is swapped in
        s.in_flight += 1
        s.body_bytes += reserve
        s.metrics.in_flight.inc()
        s.metrics.body_bytes.set(s.body_bytes)
        try:
            body = await read_body(request, cfg.max_bytes, deadline, declared)
            return await handle(live, body, deadline)
        finally:
            live.leave()
            s.in_flight -= 1
            s.body_bytes -= reserve
            s.metrics.in_flight.dec()
            s.metrics.body_bytes.set(s.body_bytes)

    async def _in_thread(self, fn: Callable, *args: Any) -> Any:
        return await anyio.to_thread.run_sync(fn, *args, limiter=self.s.limiter)

    async def _answered(self, live: Live, inputs: list, answers: list, probs: np.ndarray) -> None:
        """Count what the model answered (unknown, unsure, top score, ood_score) and keep the flagged inputs when
        serve was started with --capture."""
        self.s.metrics.answered(answers)
        capture = self.s.capture
        if capture is not None and any(a.unknown or a.unsure for a in answers):
            clf = live.classifier
            await self._in_thread(lambda: [capture.offer(x, a, p, clf.labels, clf.path)
                                           for x, a, p in zip(inputs, answers, probs)])

    async def _run(self, request: Request, live: Live, kind: str, array: np.ndarray,
                   deadline: float) -> tuple[np.ndarray, Optional[np.ndarray]]:
        """The model's answer for ``array`` (its main output, and its out-of-distribution score or None), unless
        the deadline passes or the client leaves first."""
        if time.monotonic() >= deadline:
            raise late()
        job = live.batcher.submit(kind, array, deadline)
        answer = asyncio.wrap_future(job.future)
        gone = asyncio.ensure_future(disconnected(request))
        try:
            done, _ = await asyncio.wait({answer, gone}, timeout=max(0.0, deadline - time.monotonic()),
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if answer in done:
            return answer.result()
        job.gone = "disconnected" if gone in done else "deadline"
        answer.cancel()  # withdraws the job unless the model already runs it
        if gone in done:
            raise HTTPError(499, "the client closed the connection", None)
        raise late()

    # --- small parsers

    def _current(self) -> Live:
        live = self.s.live
        if live is None:
            raise _not_loaded(self.s.name)
        return live

    def _enter(self) -> Live:
        """Count this request in on the version serving now (the swap may replace it between the read and the
        count: then the new one is taken)."""
        while True:
            live = self._current()
            if live.enter():
                return live

    def _model(self, request: Request, live: Live, reveal: bool = True) -> Served:
        name = request.path_params["model"]
        version = request.path_params.get("version")
        model = live.models.get(name)
        if model is None:
            names = ", ".join(sorted(live.models)) if reveal else "other names"
            raise HTTPError(404, f"no model named {name!r}", f"this server has {names}")
        if version is not None and version != live.version:
            raise HTTPError(404, f"model {name!r} has no version {version!r} serving",
                            f"version {live.version} serves; use it, or no version")
        return model

    def _topk(self, request: Request, live: Live) -> int:
        labels = len(live.classifier.labels)
        raw = request.query_params.getlist("topk")
        if not raw:
            return min(self.s.config.topk, labels)
        try:
            k = int(raw[-1])
        except ValueError:
            raise HTTPError(400, f"topk must be an integer, got {raw[-1]!r}", f"use ?topk=1..{labels}") from None
        if k < 1:
            raise HTTPError(400, f"topk must be at least 1, got {k}", f"use ?topk=1..{labels}")
        return min(k, labels)


# ----------------------------------------------------------------------------- helpers


def _not_loaded(name: str) -> HTTPError:
    return HTTPError(503, f"no version of {name!r} is loaded", f"POST /v2/repository/models/{name}/load, or wait for a "
                     "version to pass its checks (GET /v2/repository/index says why none has)", {"Retry-After": "1"})


def _prepare_one(clf: Classifier, body: bytearray) -> np.ndarray:
    try:
        return clf.prepare(body)
    except ImageError as e:  # load_image names in-memory sources "<bytes>"; here they are the request body
        raise ImageError(e.message.replace("<bytes>", "request body", 1), e.hint, e.kind) from None


def _one_input(req: oip.InferRequest, model: Served) -> oip.Tensor:
    spec = model.inputs[0]
    if len(req.inputs) != 1 or req.inputs[0].name != spec.name:
        got = ", ".join(repr(t.name) for t in req.inputs)
        raise HTTPError(400, f"model {model.name!r} takes one input {spec.name!r}, got {got}",
                        f"send {spec.name!r} as {spec.datatype} {[-1, *spec.dims]}")
    x = req.inputs[0]
    if x.datatype != spec.datatype:
        raise HTTPError(400, f"input {spec.name!r} must be {spec.datatype}, got {x.datatype}",
                        f"send {spec.datatype} {[-1, *spec.dims]}")
    shape = x.array.shape
    dims_ok = tuple(shape[1:]) == spec.dims or (model.image and len(shape) == 1)
    if len(shape) < 1 or shape[0] < 1 or not dims_ok:
        raise HTTPError(400, f"input {spec.name!r} has shape {list(shape)}, the model takes {[-1, *spec.dims]}",
                        "the first axis is the batch; the others must match the model's metadata")
    return x


