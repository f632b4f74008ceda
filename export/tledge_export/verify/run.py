"""Running models on the held-out images every export is verified on (:class:`Reference`: the images and
PyTorch's answers on them: logits, and for a model with an out-of-distribution output its scores, on the
held-out images and on the probe frames of :mod:`tledge_export.verify.probes`), and verifying an ONNX model on
them: :func:`verify_onnx` (any file, proto or bytes) and :func:`verify_session`. The comparison itself is the pure
:func:`tledge_export.verify.compare.compare`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from tledge_export.convert.ood_head import SCORE_NAME
from tledge_export.verify.compare import compare, compare_scores
from tledge_export.verify.probes import probe_images
from tledge_runtime.image.preprocess import Normalizer
from tledge_runtime.model.answers import Answers
from tledge_runtime.model.meta import Preprocess
from tledge_runtime.model.verification import Budget, Verification


@dataclass(frozen=True)
class Reference:
    """The held-out images every export is verified on, and PyTorch's answers on them.

    ``images``: uint8 NHWC at the model input (what a baked model takes); ``x``: the same, normalized
    NCHW float32 (what the other models take); ``logits``: PyTorch's fp32 logits on ``x``. For a model with an
    out-of-distribution output: ``scores`` (PyTorch's, on ``x``), and ``probes`` / ``probe_scores``: synthetic
    out-of-distribution frames (uint8 NHWC) and PyTorch's scores on them.
    """

    images: np.ndarray
    labels: np.ndarray
    logits: np.ndarray
    x: np.ndarray
    classes: tuple[str, ...]
    name: str = "PyTorch fp32 CPU"  # what produced ``logits``
    data: str = "held-out images"  # what the images are
    answers: Optional[Answers] = None  # how answers are decided (operating point, temperature), as on the device
    scores: Optional[np.ndarray] = None
    probes: Optional[np.ndarray] = None
    probe_x: Optional[np.ndarray] = None
    probe_scores: Optional[np.ndarray] = None

    @classmethod
    def from_model(cls, model: Any, images: np.ndarray, labels: np.ndarray, preprocess: Preprocess,
                   classes: Sequence[str], data: str = "held-out images",
                   answers: Optional[Answers] = None) -> Reference:
        """PyTorch's fp32 CPU outputs of ``model`` on ``images`` (uint8 NHWC at the model input)."""
        import torch

        images = np.ascontiguousarray(images)
        normalize = Normalizer(preprocess)
        x = normalize(images)
        name = f"PyTorch {torch.__version__.split('+')[0]} fp32 CPU"
        logits, scores = torch_outputs(model, x)
        probes = probe_x = probe_scores = None
        if scores is not None:
            probes = probe_images(preprocess.height, preprocess.width)
            probe_x = normalize(probes)
            probe_scores = torch_outputs(model, probe_x)[1]
        return cls(images, np.asarray(labels), logits, x, tuple(classes), name, data, answers, scores, probes, probe_x,
                   probe_scores)

    def inputs_for(self, elem_dtype: np.dtype, *, probes: bool = False) -> np.ndarray:
        """The images (or the probe frames) as a graph whose input has ``elem_dtype`` takes them: uint8 NHWC,
        float16 or float32 NCHW."""
        images, x = (self.probes, self.probe_x) if probes else (self.images, self.x)
        if elem_dtype == np.uint8:
            return images
        return x.astype(np.float16) if elem_dtype == np.float16 else x

    def compare(self, logits: np.ndarray, budget: Budget, *, backend: str = "",
                scores: Optional[np.ndarray] = None, probe_scores: Optional[np.ndarray] = None) -> Verification:
        """:func:`~tledge_export.verify.compare.compare` of ``logits`` (and, for a model with an
        out-of-distribution output, of its ``scores`` on the held-out images and ``probe_scores`` on the probes)
        on these images, labelled with this reference."""
        v = compare(logits, self.logits, self.labels, budget, backend=backend, classes=self.classes,
                    answers=self.answers)
        if self.scores is not None and scores is not None and probe_scores is not None:
            ood = self.answers.ood if self.answers is not None else None
            v = compare_scores(v, np.concatenate([scores, probe_scores]),
                               np.concatenate([self.scores, self.probe_scores]), ood)
        return v.with_(reference=self.name, data=self.data)


def torch_logits(model, x: np.ndarray, *, chunk: int = 32) -> np.ndarray:
    """PyTorch's fp32 logits for normalized NCHW ``x``, on the CPU: the reference every export is held to."""
    return torch_outputs(model, x, chunk=chunk)[0]


def torch_outputs(model, x: np.ndarray, *, chunk: int = 32) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """PyTorch's fp32 logits and, for a model that also returns an out-of-distribution score, the scores (N,)."""
    import torch

    model = model.eval().float().cpu()
    logits, scores = [], []
    with torch.no_grad():
        for start in range(0, len(x), chunk):
            out = model(torch.from_numpy(np.ascontiguousarray(x[start:start + chunk], dtype=np.float32)))
            if isinstance(out, (tuple, list)):
                logits.append(out[0].numpy())
                scores.append(out[1].reshape(len(out[1]), -1)[:, 0].numpy())
            else:
                logits.append(out.numpy())
    cat = np.concatenate(logits).astype(np.float32)
    return cat, (np.concatenate(scores).astype(np.float64) if scores else None)


def verify_onnx(model: Union[str, Path, bytes, Any], reference: Reference, budget: Budget, *,
                fixed_batch: Optional[int] = None, threads: Optional[int] = None) -> Verification:
    """Run an ONNX model (a file, its bytes, or an ``onnx.ModelProto``) with ONNX Runtime on the CPU over
    ``reference`` and compare it with PyTorch under ``budget``."""
    from tledge_runtime.backends.loader import ort_session

    data = model if isinstance(model, (str, Path, bytes)) else model.SerializeToString()
    return verify_session(ort_session(data, threads=threads), reference, budget, fixed_batch=fixed_batch)


def verify_session(sess: Any, reference: Reference, budget: Budget, *,
                   fixed_batch: Optional[int] = None) -> Verification:
    """:func:`verify_onnx` on an onnxruntime session that is already open."""
    import onnxruntime

    from tledge_export.graph_run import run

    backend = f"onnxruntime {onnxruntime.__version__} CPUExecutionProvider"
    dtype = _input_dtype(sess)
    names = [o.name for o in sess.get_outputs()]
    if reference.scores is None or SCORE_NAME not in names:
        logits = run(sess, reference.inputs_for(dtype), fixed_batch=fixed_batch)[0]
        return reference.compare(logits, budget, backend=backend)
    logits, scores = run(sess, reference.inputs_for(dtype), fixed_batch=fixed_batch, outputs=[names[0], SCORE_NAME])
    probe = run(sess, reference.inputs_for(dtype, probes=True), fixed_batch=fixed_batch, outputs=[SCORE_NAME])[0]
    return reference.compare(logits, budget, backend=backend, scores=scores.reshape(len(scores), -1)[:, 0],
                             probe_scores=probe.reshape(len(probe), -1)[:, 0])


def _input_dtype(sess: Any) -> np.dtype:
    kind = sess.get_inputs()[0].type
    return np.dtype({"tensor(uint8)": np.uint8, "tensor(float16)": np.float16}.get(kind, np.float32))
