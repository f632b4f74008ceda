"""The reference set every exported model carries (see :mod:`tledge_runtime.model.reference_set`): which held-out
images, re-encoded how, with which fingerprints and PyTorch logits, within which size.

Images: a few held-out images, stratified over the classes, most confidently classified by PyTorch first
(a reference is a check of the device, not of a borderline decision), each re-encoded as a small JPEG and
fingerprinted by decoding *those* bytes with the runtime's own code. Synthetic inputs: the two patterns
of 16 seeds PyTorch separates most clearly. ``reference_images=0`` (``--no-reference-images``) keeps only
the synthetic ones: no pixel of private data leaves in the model file.

Size: at most 5% of the model file or 512 KB, whichever is smaller; images are dropped, least
confident first, until it fits.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, Optional

import numpy as np
import onnx

from tledge_export.convert.ood_head import SCORE_NAME
from tledge_export.verify.run import Reference, torch_outputs
from tledge_runtime.check.trace import encode_reference_image, trace
from tledge_runtime.model.meta import Preprocess
from tledge_runtime.model.reference_set import ReferenceItem, ReferenceSet, synthetic_image

log = logging.getLogger(__name__)

MAX_FRACTION = 0.05  # of the model file
MAX_BYTES = 512 * 1024
JPEG_QUALITY = 90
SYNTHETIC_CANDIDATES = 16
SYNTHETIC_KEPT = 2


def build_reference_set(model: Any, preprocess: Preprocess, reference: Reference, count: int,
                        sources: Optional[Sequence[Any]] = None) -> ReferenceSet:
    """``count`` held-out images (from ``sources``, the files behind ``reference.images``, else the decoded
    arrays themselves) and the synthetic inputs, each with this machine's fingerprints and PyTorch's logits.
    Items are ordered by priority: :func:`fit` drops from the end."""
    items = []
    for i in _choose(reference, count):
        source = sources[i] if sources is not None else reference.images[i]
        encoded = encode_reference_image(source, preprocess, JPEG_QUALITY)
        traced = trace(encoded, preprocess)
        logits, scores = torch_outputs(model, traced.tensor)
        items.append(ReferenceItem(tuple(logits[0].tolist()), traced.fingerprint,
                                   image=base64.b64encode(encoded).decode("ascii"), label=int(reference.labels[i]),
                                   ood_score=None if scores is None else float(scores[0])))
    return ReferenceSet(tuple(_synthetic(model, preprocess) + items))


def _choose(reference: Reference, count: int) -> list[int]:
    """Indices of held-out images: round robin over the classes, each class's most confident first."""
    logits = reference.logits
    top2 = np.sort(logits, axis=1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    correct = logits.argmax(1) == reference.labels
    queues = []
    for c in np.unique(reference.labels):
        rows = np.flatnonzero((reference.labels == c) & correct)
        queues.append(list(rows[np.argsort(-margin[rows], kind="stable")]))
    chosen: list[int] = []
    while len(chosen) < count and any(queues):
        for q in queues:
            if q and len(chosen) < count:
                chosen.append(int(q.pop(0)))
    return chosen


def _synthetic(model: Any, p: Preprocess) -> list[ReferenceItem]:
    traced = [trace(synthetic_image(seed, p.height, p.width), p) for seed in range(SYNTHETIC_CANDIDATES)]
    logits, scores = torch_outputs(model, np.concatenate([t.tensor for t in traced]))
    top2 = np.sort(logits, axis=1)[:, -2:]
    best = np.argsort(-(top2[:, 1] - top2[:, 0]), kind="stable")[:SYNTHETIC_KEPT]
    return [ReferenceItem(tuple(logits[i].tolist()), traced[i].fingerprint, seed=int(i),
                          ood_score=None if scores is None else float(scores[i])) for i in sorted(best)]


def size_of(refs: ReferenceSet) -> int:
    """Bytes the set adds to a model file's metadata (compact JSON, as written)."""
    return len(json.dumps(refs.to_dict(), separators=(",", ":")).encode("utf-8"))


def fit(refs: ReferenceSet, model_bytes: int) -> ReferenceSet:
    """``refs`` without its last images until it adds at most 5% of ``model_bytes`` or 512 KB."""
    cap = min(int(MAX_FRACTION * model_bytes), MAX_BYTES)
    items = list(refs.items)
    while items and items[-1].image and size_of(ReferenceSet(tuple(items))) > cap:
        items.pop()
    fitted = ReferenceSet(tuple(items))
    if len(items) < len(refs.items):
        log.info("reference set: %d of %d images kept (%d bytes, cap %d for a %.1f MB model)", fitted.images,
                 refs.images, size_of(fitted), cap, model_bytes / 1e6)
    return fitted


def with_tolerance(refs: ReferenceSet, model: Any, preprocess: Preprocess, precision: str) -> ReferenceSet:
    """``refs`` with the tolerance an fp16/int8 ``model`` (an ONNX proto) earns on its items: twice its largest
    |Δlogit| from PyTorch there, run with onnxruntime on the CPU, at least 0.05. fp32 models keep none."""
    if precision == "fp32":
        return refs
    from tledge_export.graph_run import run, session
    from tledge_runtime.check.replay import MIN_ACCURACY_TOLERANCE

    traced = [trace(item, preprocess) for item in refs.items]
    elem = model.graph.input[0].type.tensor_type.elem_type
    if elem == onnx.TensorProto.UINT8:
        x = np.stack([t.tensor_u8 for t in traced])
    else:  # float32, or float16 for a model exported with fp16 I/O
        x = np.concatenate([t.tensor for t in traced]).astype(np.float16 if elem == onnx.TensorProto.FLOAT16
                                                                 else np.float32)
    scored = any(o.name == SCORE_NAME for o in model.graph.output) and refs.items[0].ood_score is not None
    outputs = run(session(model), x, outputs=[model.graph.output[0].name] + ([SCORE_NAME] if scored else []))
    worst = float(np.abs(outputs[0] - np.array([item.logits for item in refs.items])).max())
    refs = replace(refs, tolerance=round(max(2 * worst, MIN_ACCURACY_TOLERANCE), 6))
    if scored:
        moved = np.abs(outputs[1].reshape(-1) - np.array([item.ood_score for item in refs.items]))
        scale = max(1.0, float(np.abs([item.ood_score for item in refs.items]).max()))
        refs = replace(refs, ood_tolerance=round(max(2 * float(moved.max()), MIN_ACCURACY_TOLERANCE * scale), 6))
    return refs

