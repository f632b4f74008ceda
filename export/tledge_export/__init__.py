"""tledge-export: PyTorch classifier -> verified ONNX / TensorRT with tledge metadata.

The API is one call::

    from tledge_export import ExportConfig, export_model
    result = export_model(model, meta, verify_images=u8_nhwc, verify_labels=labels,
                          calib_images=u8_nhwc_calib, config=ExportConfig(out="export", fp16=True, int8=True))
    print(result.table())
    result.raise_for_failures()      # ExportFailed listing each format over budget, with its numbers

Modules, one per stage: :mod:`.onnx_export` (torch -> fp32 ONNX), :mod:`.bake`
(preprocessing inside the graph), :mod:`.fp16`, :mod:`.int8` (QDQ calibration),
:mod:`.sensitivity` and :mod:`.accuracy_aware` (int8 within an accuracy budget),
:mod:`.verify` (parity with PyTorch), :mod:`.tensorrt` and :mod:`.engines` (TensorRT),
:mod:`.triton` (model repository), :mod:`.artifact` (files and metadata),
:mod:`.pipeline` (the chain). Names are loaded on first use, so importing the package
does not import torch or onnx.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
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
    from .config import ExportConfig
    from .errors import EngineError, ExportError, ExportFailed
    from .pipeline import export_model
    from .results import ExportResult, FormatResult

_WHERE = {"ExportConfig": "config", "export_model": "pipeline", "ExportResult": "results", "FormatResult": "results",
          "ExportError": "errors", "ExportFailed": "errors", "EngineError": "errors"}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module 'tledge_export' has no attribute {name!r}")
