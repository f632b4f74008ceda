"""tledge-export: PyTorch classifier -> verified ONNX / TensorRT with tledge metadata.

The API is one call::

    from tledge_export import ExportConfig, export_model
    result = export_model(model, meta, verify_images=u8_nhwc, verify_labels=labels,
                          calib_images=u8_nhwc_calib, config=ExportConfig(out="export", fp16=True, int8=True))
    print(result.table())
    result.raise_for_failures()      # ExportFailed listing each format over budget, with its numbers

Folders by stage: ``convert/`` (torch -> fp32 ONNX, static padding, baked preprocessing, fp16),
``int8/`` (QDQ calibration, sensitivity, accuracy-aware search, QAT), ``verify/`` (parity with PyTorch, the
embedded reference set); at the top, :mod:`.steps` (one function per format), :mod:`.pipeline` (the chain),
:mod:`.engines` (TensorRT), :mod:`.triton` (model repository), :mod:`.artifact` (files and metadata) and
:mod:`.config` (every knob and budget). Names are loaded on first use, so importing the package
does not import torch or onnx.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tledge_export.version import __version__

__all__ = [
    "EngineError",
    "ExportConfig",
    "ExportError",
    "ExportFailed",
    "ExportResult",
    "FormatResult",
    "__version__",
    "export_model",
]

if TYPE_CHECKING:
    from tledge_export.config import ExportConfig
    from tledge_export.errors import EngineError, ExportError, ExportFailed
    from tledge_export.pipeline import export_model
    from tledge_export.results import ExportResult, FormatResult

_WHERE = {"ExportConfig": "config", "export_model": "pipeline", "ExportResult": "results", "FormatResult": "results",
          "ExportError": "errors", "ExportFailed": "errors", "EngineError": "errors"}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module 'tledge_export' has no attribute {name!r}")
