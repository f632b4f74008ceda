"""Parity with PyTorch: the pure comparison (``compare``), the gate that judges it (``gate``), running models on
the held-out images (``run``: :class:`Reference`, :func:`verify_onnx` on any ONNX file), the out-of-distribution
probes and the reference set written into every file (``references``)."""

from tledge_export.verify.compare import compare
from tledge_export.verify.run import Reference, verify_onnx, verify_session

__all__ = ["Reference", "compare", "verify_onnx", "verify_session"]
