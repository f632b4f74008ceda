"""One model version as ``tledge-runtime serve`` runs it, and the swap that replaces it without dropping a request.

A :class:`Live` is a version's classifier, its batcher (the thread that runs the model) and the names and
tensors it is served under. Each inference request enters the version serving when it is admitted and
leaves it when answered, so it is decoded, batched, run and described (``model_version``) by one version
from start to end. A swap is one assignment of ``State.live`` (:func:`swap`); the version it replaces is
*retired*: it takes no new requests, and once the last one in flight leaves, its batcher stops and its
classifier is released (closed when nothing else holds it), so memory does not grow with the swaps.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from tledge_runtime.backends.engine_file import is_engine_file
from tledge_runtime.serve.batch import Batcher
from tledge_runtime.serve.metrics import Metrics
from tledge_runtime.serve.served_model import served_models

if TYPE_CHECKING:
    from tledge_runtime.classifier import Classifier

log = logging.getLogger("tledge_runtime")


class Live:
    """A version serving (or finishing the requests it took before it was replaced)."""

    def __init__(self, classifier: Classifier, version: str, signature: dict[str, Any] | str, name: str,
                 max_batch: int, metrics: Metrics, on_close: Callable[[], None] | None = None):
        self.classifier, self.version, self.signature, self.name = classifier, version, signature, name
        self.models = served_models(classifier.meta, name, engine=is_engine_file(classifier.path), version=version)
        self.batcher = Batcher(classifier, max_batch, metrics)
        self._on_close = on_close
        self._lock = threading.Lock()
        self._users = 0
        self._retired = False
        self._closed = False

    def enter(self) -> bool:
        """Count a request in; False once this version is retired (the caller takes the new one)."""
        with self._lock:
            if self._retired:
                return False
            self._users += 1
            return True

    def leave(self) -> None:
        with self._lock:
            self._users -= 1
            idle = self._retired and self._users == 0
        if idle:  # off the caller's thread: stopping the batcher waits for the run in progress
            threading.Thread(target=self.close, name="tledge-retire", daemon=True).start()

    def retire(self) -> None:
        """Take no new requests; close once the requests in flight have left."""
        with self._lock:
            self._retired = True
            idle = self._users == 0
        if idle:
            self.close()

    def close(self) -> None:
        """Stop the batcher (queued jobs are answered Dropped) and release the classifier; once."""
        with self._lock:
            if self._closed:
                return
            self._closed = self._retired = True
        self.batcher.close()
        if self._on_close is not None:
            self._on_close()
        log.debug("%s version %s closed", self.name, self.version)

    def model_info(self) -> dict[str, str]:
        """The labels of the ``tledge_model`` metric for this version."""
        meta = self.classifier.meta
        return {"name": self.name, "file": self.classifier.path.name, "backend": self.classifier.backend_name,
                "precision": meta.precision, "architecture": meta.provenance.architecture,
                "classes": str(meta.num_classes), "model_version": self.version}


def swap(state: Any, new: Live | None) -> None:
    """Serve ``new`` from now on (None: nothing serves) and retire the version it replaces."""
    old, state.live = state.live, new
    if new is not None:
        state.metrics.set_model(new.model_info())
    else:
        state.metrics.version.set(0)
    if old is not None and old is not new:
        old.retire()
