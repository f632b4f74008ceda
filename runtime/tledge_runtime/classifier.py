"""``Classifier(path).predict(frame)``: the runtime's whole API in one object.

The classifier reads the model's metadata, opens a backend (:mod:`tledge_runtime.backends.loader`),
and turns any image source into the graph's input exactly as the training eval
transform does (:mod:`tledge_runtime.image.preprocess`): normalized float NCHW for ordinary models,
uint8 NHWC at model size for models whose normalization is baked into the graph.
Scores are probabilities: a softmax of the logits at the model's calibration temperature, or the graph's
own probabilities when its output kind says so; the answer is the top class, or the class a binary model's
operating point decides (:mod:`tledge_runtime.answers.decision`, the rule export verification used).
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np

from tledge_runtime.answers.capture import Capture
from tledge_runtime.answers.prediction import Answerer, Prediction
from tledge_runtime.backends.batching import pad_to
from tledge_runtime.backends.loader import Backend, open_backend
from tledge_runtime.errors import BackendError, ImageError, ModelError, SignatureError, TledgeError
from tledge_runtime.image.budgets import DEFAULT_LIMITS, ImageLimits
from tledge_runtime.image.decode import ImageInput
from tledge_runtime.image.preprocess import Normalizer, prepare_image
from tledge_runtime.model.meta import ModelMeta

log = logging.getLogger("tledge_runtime")

# Largest batch sent to a dynamic-batch graph in one run: bounds memory for long lists.
DEFAULT_CHUNK = 32


class Classifier:
    """A tledge model ready to classify images; safe to share between threads.

    ``device``: ``"auto"`` (a GPU if one is usable, else the CPU), ``"cpu"`` or ``"gpu"``.
    ``backend``: force one of :data:`tledge_runtime.backends.loader.BACKENDS`.
    ``threads``: CPU threads per inference (default: the engine's own choice).
    ``max_pixels`` / ``max_image_bytes``: what one input image may cost, checked before its pixels are
    decoded (defaults: :class:`~tledge_runtime.image.budgets.ImageLimits`, ~89.5 MP and 256 MiB; all decodes of the
    process together stay within ``TLEDGE_DECODE_MEMORY_MB``, default 256). Over a limit: ``ImageError``.
    ``check``: replay the model's embedded reference set on this backend first (decode, resize, normalize,
    numerics; see :mod:`tledge_runtime.check.replay`) and refuse the model with ``CheckFailed`` if anything differs.
    ``trusted_keys``: public key files (PEM); the folder holding the model must carry a ``model.sig`` by one of
    them covering every file in it, checked before the model is read (``SignatureError`` naming the file that
    differs or the key that signed otherwise; see :mod:`tledge_runtime.repository.signature`).
    ``signature`` is then the :class:`~tledge_runtime.repository.signature.Verified` result (else None).
    ``capture``: a folder where :meth:`predict` keeps the inputs it answers unknown or unsure, for a person to sort
    into class folders and fine-tune on (:mod:`tledge_runtime.answers.capture`; an unwritable folder: TledgeError).
    """

    def __init__(self, path: str | os.PathLike, device: str = "auto", backend: str | None = None,
                 threads: int | None = None, *, max_pixels: int | None = None, max_image_bytes: int | None = None,
                 check: bool = False, trusted_keys: Iterable[Any] | None = None,
                 capture: str | os.PathLike | None = None):
        self.limits = ImageLimits(max_pixels=max_pixels or DEFAULT_LIMITS.max_pixels,
                                  max_bytes=max_image_bytes or DEFAULT_LIMITS.max_bytes)
        self.signature = _verify(path, trusted_keys)  # before a byte of the model is parsed
        opened = open_backend(path, device=device, backend=backend, threads=threads)
        self.path = Path(path)
        self.meta: ModelMeta = opened.meta
        self.backend_reason = opened.reason
        self._backend: Backend | None = opened.backend
        self._close_lock = threading.Lock()
        spec = opened.backend.input_dtype
        self._baked = spec == np.uint8
        self._normalizer = None if self._baked else Normalizer(
            self.meta.preprocess, dtype=np.float16 if spec == np.float16 else np.float32)
        self._nhwc = self.meta.input.layout == "NHWC"
        self.answerer = Answerer(self.meta)
        # Inputs flagged unknown or unsure are kept here for a person to sort (tledge_runtime.answers.capture).
        self.capture = Capture(capture, model_path=self.path) if capture is not None else None
        b = opened.backend
        self._chunk = b.fixed_batch or min(b.max_batch or DEFAULT_CHUNK, DEFAULT_CHUNK)
        self.check_report: Any = None  # the latest self_check() (a CheckReport); serve's /info reports it
        if self.signature is not None and not self.signature.unchanged():  # swapped between verify and load
            self.close()
            raise SignatureError(f"{self.path.parent}: its files changed while the model was loading",
                                 hint="load it again once the update is complete")
        if check:
            try:
                self.self_check().raise_for_failures()
            except BaseException:
                self.close()
                raise

    def self_check(self) -> Any:
        """:class:`~tledge_runtime.check.replay.CheckReport` of this model's reference set on this Classifier's backend."""
        from tledge_runtime.check.replay import CheckReport, check_numerics, reference_set_of, trace_references

        traces, stages = trace_references(self.meta, self.path.name)
        refs = reference_set_of(self.meta, self.path.name)
        report = CheckReport(self.path.name, len(refs.items), refs.images, stages,
                             [check_numerics(self.meta, self.backend_name, self.run_graph_scored, traces)])
        log.info("%s: reference check on %s: %s", self.path.name, self.backend_name,
                 "all stages hold" if report.ok else "; ".join(report.failures()))
        self.check_report = report
        return report

    # ---------------------------------------------------------------- properties

    @property
    def labels(self) -> tuple[str, ...]:
        return self.meta.labels

    @property
    def backend_name(self) -> str:
        """Which backend runs the model: ort-cpu, ort-cuda, ort-tensorrt, tensorrt or openvino."""
        return self._live().name

    @property
    def max_batch(self) -> int:
        """How many images go to the model in one run (a fixed-batch graph's size, or a chunk)."""
        return self._chunk

    # ---------------------------------------------------------------- predictions

    def predict(self, x: ImageInput, channel_order: str = "rgb") -> Prediction:
        """The answer for one image (path, bytes, PIL image, or HxWx3 uint8 array): the most likely class (or the
        class the model's operating point decides), its calibrated probability, the prediction set and "unknown"
        where the model carries them."""
        return self.predict_batch([x], channel_order)[0]

    def predict_batch(self, xs: Iterable[ImageInput], channel_order: str = "rgb") -> list[Prediction]:
        """``predict`` for many images, run through the model in batches."""
        xs = list(xs)
        prepared = [self.prepare(x, channel_order) for x in xs]
        if not prepared:
            return []
        probs, scores = self.infer_scored(np.stack(prepared))
        answers = self.answerer.predictions(probs, scores)
        if self.capture is not None:
            for x, answer, row in zip(xs, answers, probs):
                self.capture.offer(_rgb(x, channel_order), answer, row, self.labels)
        return answers

    def answer(self, probs: np.ndarray, ood_score: Optional[float] = None) -> Prediction:
        """The answer for one row of probabilities (from :meth:`scores` or :meth:`infer`) and, for a model with an
        out-of-distribution output, its score (from :meth:`infer_scored`)."""
        ood = None if ood_score is None else np.array([ood_score])
        return self.answerer.predictions(np.asarray(probs)[None], ood)[0]

    def decide(self, probs: np.ndarray) -> np.ndarray:
        """The decided class index of each row of an ``N x classes`` probability array."""
        return self.answerer.decide(probs)

    def topk(self, x: ImageInput, k: int = 5, channel_order: str = "rgb") -> list[Prediction]:
        """The ``k`` most likely classes of one image, best first (fewer if the model has fewer classes)."""
        _check_k(k)
        return self.rank(self.scores(x, channel_order), k)

    def rank(self, probs: np.ndarray, k: int = 1) -> list[Prediction]:
        """The ``k`` best classes of one row of probabilities (from :meth:`scores` or :meth:`infer`), best first."""
        _check_k(k)
        order = np.argsort(-np.asarray(probs), kind="stable")[:k]  # stable: ties keep label order
        return [self._at(probs, int(i)) for i in order]

    def scores(self, x: ImageInput, channel_order: str = "rgb") -> np.ndarray:
        """Per-class probabilities of one image, in label order."""
        return self.infer(self.prepare(x, channel_order)[None])[0]

    def scores_batch(self, xs: Iterable[ImageInput], channel_order: str = "rgb") -> np.ndarray:
        """Per-class probabilities of several images: an ``N x classes`` array."""
        prepared = [self.prepare(x, channel_order) for x in xs]
        if not prepared:
            return np.zeros((0, self.meta.num_classes), dtype=np.float64)
        return self.infer(np.stack(prepared))

    # ---------------------------------------------------------------- the two halves

    def prepare(self, x: ImageInput, channel_order: str = "rgb") -> np.ndarray:
        """Load, convert and resize/crop one image: ``H x W x 3`` uint8 RGB at model size.

        The CPU-heavy half of a prediction; servers and video loops run it apart from :meth:`infer`.
        """
        return prepare_image(x, self.meta.preprocess, channel_order=channel_order, limits=self.limits)

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities for a batch of prepared images (``N x H x W x 3`` uint8, from :meth:`prepare`)."""
        return self.infer_scored(batch)[0]

    def infer_scored(self, batch: np.ndarray) -> tuple[np.ndarray, Optional[np.ndarray]]:
        """Probabilities and, for a model with an out-of-distribution output, its score per image (else None)."""
        p = self.meta.preprocess
        if not isinstance(batch, np.ndarray) or batch.dtype != np.uint8 or batch.shape[1:] != (p.height, p.width, 3):
            got = f"{batch.dtype} {batch.shape}" if isinstance(batch, np.ndarray) else type(batch).__name__
            raise ImageError(f"infer() takes an N x {p.height} x {p.width} x 3 uint8 batch, got {got}",
                             hint="build it with np.stack([clf.prepare(x) for x in images])", kind="bad_array")
        backend = self._live()
        chunks = [self._run_chunk(backend, batch[i:i + self._chunk]) for i in range(0, len(batch), self._chunk)]
        if not chunks:
            return np.zeros((0, self.meta.num_classes)), None
        probs = np.concatenate([c[0] for c in chunks])
        scores = None if chunks[0][1] is None else np.concatenate([c[1] for c in chunks])
        return probs, scores

    def run_graph(self, tensor: np.ndarray) -> np.ndarray:
        """The graph's raw output for a batch already in the graph's input format (what Triton clients send).

        ``tensor``: ``N x 3 x H x W`` normalized float (``N x H x W x 3`` uint8 for baked models), the
        dtype the graph takes. Returns ``N x classes`` logits (or probabilities, per ``meta.output.kind``).
        """
        return self.run_graph_scored(tensor)[0]

    def run_graph_scored(self, tensor: np.ndarray) -> tuple[np.ndarray, Optional[np.ndarray]]:
        """:meth:`run_graph`, and the graph's out-of-distribution score output when it has one (else None)."""
        backend = self._live()
        shape = self.graph_input_shape
        if not isinstance(tensor, np.ndarray) or tensor.ndim != 4 or tensor.shape[1:] != shape[1:]:
            got = f"{tensor.dtype} {tensor.shape}" if isinstance(tensor, np.ndarray) else type(tensor).__name__
            raise ImageError(f"the graph takes an N x {' x '.join(str(d) for d in shape[1:])} {backend.input_dtype} "
                             f"tensor, got {got}", hint="send the preprocessed tensor the model's metadata describes",
                             kind="bad_array")
        tensor = tensor.astype(backend.input_dtype, copy=False)
        chunks = [self._run_tensor(backend, tensor[i:i + self._chunk]) for i in range(0, len(tensor), self._chunk)]
        if not chunks:
            return np.zeros((0, self.meta.num_classes)), None
        scores = None if chunks[0][1] is None else np.concatenate([c[1] for c in chunks])
        return np.concatenate([c[0] for c in chunks]), scores

    @property
    def graph_input_shape(self) -> tuple:
        """The graph input's shape with the batch axis as None: ``(None, 3, H, W)`` or ``(None, H, W, 3)``."""
        p = self.meta.preprocess
        return (None, p.height, p.width, 3) if self._nhwc else (None, 3, p.height, p.width)

    def _run_chunk(self, backend: Backend, chunk: np.ndarray) -> tuple[np.ndarray, Optional[np.ndarray]]:
        if self._normalizer is None:
            tensor = chunk  # baked preprocessing: the graph takes uint8 NHWC as it is
        else:
            tensor = self._normalizer(chunk)
            if self._nhwc:
                tensor = np.ascontiguousarray(tensor.transpose(0, 2, 3, 1))
        out, score = self._run_tensor(backend, tensor)
        return self.answerer.probabilities(out), score

    def _run_tensor(self, backend: Backend, tensor: np.ndarray) -> tuple[np.ndarray, Optional[np.ndarray]]:
        """One chunk of graph input -> float64 graph output (and score), padded to a fixed batch and checked."""
        n = len(tensor)
        raw, raw_score = backend.run_scored(pad_to(tensor, backend.fixed_batch))
        out = np.asarray(raw, dtype=np.float64)
        # The load check saw the graph's declared shapes; a graph whose output width depends on its input
        # passes it. Check what came back, every run, before anything indexes the labels with it.
        if out.ndim != 2 or out.shape[1] != self.meta.num_classes or len(out) < n:
            raise ModelError(f"{self.path.name}: the model returned an output of shape {out.shape} for a batch of "
                             f"{n}, the metadata lists {self.meta.num_classes} labels",
                             hint="the graph does not match its metadata; re-export it with `tledge export`")
        score = None
        if raw_score is not None:
            score = np.asarray(raw_score, dtype=np.float64).reshape(len(raw_score), -1)
            if score.shape[1] != 1 or len(score) < n:
                raise ModelError(f"{self.path.name}: the out-of-distribution output has shape {score.shape} for a "
                                 f"batch of {n}, expected one score per image",
                                 hint="the graph does not match its metadata; re-export it with `tledge export`")
            score = score[:n, 0]
        out = out[:n]
        if not np.all(np.isfinite(out)) or (score is not None and not np.all(np.isfinite(score))):
            raise BackendError(f"the model produced non-finite outputs on backend {backend.name}",
                               hint="an fp16 model may overflow on this input; try the fp32 export")
        return out, score

    def _at(self, probs: np.ndarray, i: int) -> Prediction:
        return Prediction(label=self.meta.labels[i], index=i, score=float(probs[i]))

    # ---------------------------------------------------------------- lifetime

    def _live(self) -> Backend:
        backend = self._backend
        if backend is None:
            raise BackendError(f"{self.path.name}: this Classifier was closed", hint="create a new Classifier")
        return backend

    def close(self) -> None:
        """Free the backend (GPU memory, sessions). Further predictions raise BackendError."""
        with self._close_lock:
            backend, self._backend = self._backend, None
        if backend is not None:
            backend.close()

    def __enter__(self) -> Classifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = self._backend.name if self._backend is not None else "closed"
        return f"Classifier({str(self.path)!r}, backend={state!r}, labels={len(self.labels)})"


def _verify(path: str | os.PathLike, trusted_keys: Iterable[Any] | None) -> Any:
    if trusted_keys is None:
        return None
    from tledge_runtime.repository.keys import load_trusted_keys
    from tledge_runtime.repository.signature import verify_model_file

    return verify_model_file(path, load_trusted_keys(trusted_keys))


def _rgb(x: Any, channel_order: str) -> Any:
    """An input as it should be kept: a BGR camera frame turned RGB (a kept PNG must look like the scene)."""
    if isinstance(x, np.ndarray) and str(channel_order).lower() == "bgr" and x.ndim == 3 and x.shape[2] >= 3:
        return np.ascontiguousarray(x[:, :, [2, 1, 0]])
    return x


def _check_k(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise TledgeError(f"k must be a positive integer, got {k!r}", hint="ask for k >= 1 classes")
