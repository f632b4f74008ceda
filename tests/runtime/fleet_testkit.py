"""Helpers of the fleet tests: real EC keys, real signed version folders of real checked models.

Each version of the colour model (see ``runtime_testkit``) gets its own bias, ``version / 100`` on class
``version % 3``, so the scores a server returns say which version computed them, and carries a reference
set (two synthetic inputs, their fingerprints and the logits ONNX Runtime computes for that version), so
``check=True`` passes. ``scale`` multiplies the weights *after* the logits were recorded: a version
whose numerics differ from its own reference (the reference check refuses it).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Optional

import numpy as np
import onnx
from onnx import numpy_helper
from runtime_testkit import build_graph, make_meta

from tledge_runtime.check.trace import trace
from tledge_runtime.model.answers import Answers
from tledge_runtime.model.meta import ONNX_KEY
from tledge_runtime.model.reference_set import ReferenceItem, ReferenceSet


def make_key(folder: Path, name: str = "fleet", curve: str = "secp256r1") -> tuple[Path, Path]:
    """A fresh EC key pair as PEM files: (private key, mode 0600; public key)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(getattr(ec, curve.upper())())
    folder.mkdir(parents=True, exist_ok=True)
    private, public = folder / f"{name}.key", folder / f"{name}.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    os.chmod(private, 0o600)
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


def bias_of(version: int) -> np.ndarray:
    b = np.zeros(3, dtype=np.float32)
    b[version % 3] = version / 100.0
    return b


def checked_model(path: Path, version: int = 1, *, scale: float = 1.0, answers: Optional[Answers] = None) -> Path:
    """The colour model with ``bias_of(version)`` and a reference set of its own logits; ``scale`` != 1 changes
    the weights after the logits were recorded, so the reference check fails. ``answers`` with an ``ood`` part: the
    graph has the ``ood_score`` output too, and the reference items carry its values."""
    import onnxruntime as ort

    meta = make_meta() if answers is None else replace(make_meta(), answers=answers)
    graph = build_graph(ood=answers is not None and answers.ood is not None)
    _set(graph, "B", bias_of(version))
    traces = [trace(ReferenceItem((0.0,), _blank(), seed=s), meta.preprocess) for s in (3, 7)]
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    outputs = session.run(None, {"input": np.concatenate([t.tensor for t in traces])})
    scores = outputs[1][:, 0] if len(outputs) > 1 else [None] * len(traces)
    refs = ReferenceSet(tuple(ReferenceItem(tuple(map(float, row)), t.fingerprint, seed=s,
                                            ood_score=None if o is None else float(o))
                              for row, t, s, o in zip(outputs[0], traces, (3, 7), scores)))
    if scale != 1.0:
        w = numpy_helper.to_array(next(i for i in graph.graph.initializer if i.name == "W"))
        _set(graph, "W", (w * scale).astype(np.float32))
    graph.metadata_props.append(onnx.StringStringEntryProto(key=ONNX_KEY,
                                                            value=meta.with_(reference_set=refs).to_json()))
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(graph, str(path))
    return path


def version_folder(root: Path, version: int, *, name: str = "colour", key: Path | None = None,
                   scale: float = 1.0) -> Path:
    """``root/name/version/model.onnx`` (written in a staging folder, then renamed into place, as an update agent
    does), signed with ``key`` when given."""
    staging = root / name / f".staging-{version}"
    shutil.rmtree(staging, ignore_errors=True)
    checked_model(staging / "model.onnx", version, scale=scale)
    if key is not None:
        sign(staging, key)
    final = root / name / str(version)
    os.rename(staging, final)
    return final


def sign(folder: Path, key: Path) -> str:
    from tledge_export.signing import sign_folder

    return sign_folder(folder, key)


def expected_probabilities(version: int, image: np.ndarray) -> np.ndarray:
    """What version ``version`` answers for a prepared ``image`` (HxWx3 uint8 at model size)."""
    from tledge_runtime.image.preprocess import Normalizer

    x = Normalizer(make_meta().preprocess)(image[None])[0]
    logits = x.mean(axis=(1, 2)).astype(np.float64) + bias_of(version)
    e = np.exp(logits - logits.max())
    return e / e.sum()


def _set(graph: onnx.ModelProto, name: str, value: np.ndarray) -> None:
    init = next(i for i in graph.graph.initializer if i.name == name)
    init.CopyFrom(numpy_helper.from_array(value, name))


def _blank():
    from tledge_runtime.model.reference_set import Fingerprint

    return Fingerprint("", "", "")
