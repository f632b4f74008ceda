"""Prometheus metrics of ``tledge-runtime serve``, in a registry of their own (several servers may share a process)."""

from __future__ import annotations

from typing import Any

# Request latency buckets, seconds: a small model answers in milliseconds, a slow upload in seconds.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
SCORE_BUCKETS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999)  # the answer's probability: how sure the model is
# Out-of-distribution scores: a detector's own scale (squared distances, 1 - cosine, energies), so a wide ladder.
OOD_BUCKETS = (-100.0, -10.0, -1.0, 0.0, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0, 10000.0)


class Metrics:
    """Requests by endpoint and status, latency, batch sizes, queue depth, dropped work, the model served."""

    def __init__(self, model: dict[str, str]):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("tledge_requests", "HTTP requests answered, by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.latency = Histogram("tledge_request_seconds", "time from the request's headers to its answer",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch = Histogram("tledge_batch_size", "images or tensors per model run", buckets=BATCH_BUCKETS,
                               registry=r)
        self.in_flight = Gauge("tledge_in_flight", "inference requests admitted and not yet answered", registry=r)
        self.queue = Gauge("tledge_queue_depth", "jobs waiting for the model", registry=r)
        self.body_bytes = Gauge("tledge_body_bytes_reserved", "request-body bytes admitted and held", registry=r)
        self.dropped = Counter("tledge_dropped", "jobs dropped before the model ran them", ["reason"], registry=r)
        self.refused = Counter("tledge_refused", "requests refused before their body was read", ["reason"],
                               registry=r)
        self.model = Info("tledge_model", "the model served", registry=r)
        self.model.info(model)
        # Fleet updates (serve --model-dir): the version serving, swaps, and each version refused by the step that
        # refused it (signature, load, check, rollback, changed); the reasons themselves are in the log and in
        # GET /v2/repository/index.
        self.version = Gauge("tledge_model_version", "the model version serving (0: none)", registry=r)
        self.swaps = Counter("tledge_model_swaps", "model versions swapped in while serving", registry=r)
        self.versions_refused = Counter("tledge_versions_refused", "model versions refused, by the step that "
                                        "refused them", ["reason"], registry=r)
        # What the answers say, per model name (a fleet's Prometheus sees drift): images answered, the ones the model
        # called unknown or unsure (a prediction set of more than one class), and how the scores are spread.
        self.answers = Counter("tledge_answers", "images answered", ["model"], registry=r)
        self.unknown = Counter("tledge_unknown", "images answered 'unknown' (out of distribution)", ["model"],
                               registry=r)
        self.unsure = Counter("tledge_unsure", "images whose prediction set is not one class", ["model"], registry=r)
        self.top_score = Histogram("tledge_top_score", "calibrated probability of the answer", ["model"],
                                   buckets=SCORE_BUCKETS, registry=r)
        self.ood_score = Histogram("tledge_ood_score", "out-of-distribution score (higher: further from the "
                                   "training data)", ["model"], buckets=OOD_BUCKETS, registry=r)
        self._model_name = model.get("name", "")

    def answered(self, answers: list) -> None:
        """Count the answers (:class:`~tledge_runtime.answers.prediction.Prediction`) of one request."""
        name = self._model_name
        for a in answers:
            self.answers.labels(name).inc()
            self.top_score.labels(name).observe(a.score)
            if a.unknown is not None:
                self.ood_score.labels(name).observe(a.ood_score)
                if a.unknown:
                    self.unknown.labels(name).inc()
            if a.unsure:
                self.unsure.labels(name).inc()

    def set_model(self, info: dict[str, str]) -> None:
        """The model serving now (after a swap): its labels and its version number."""
        self.model.info(info)
        version = info.get("model_version", "")
        self.version.set(int(version) if version.isdigit() else 0)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def observe(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def sample(self, name: str, **labels: Any) -> float:
        """One sample's current value (tests and the benchmark read the counters this way)."""
        value = self.registry.get_sample_value(name, labels or None)
        return 0.0 if value is None else value
