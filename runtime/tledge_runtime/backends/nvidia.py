"""What NVIDIA software and hardware this machine has: cuda-python, TensorRT (full or for RTX), the GPU's
compute capability and, on a Jetson, the L4T release. The one place these are imported or probed.

Engines are tied to the TensorRT version and the GPU (and on Jetson the JetPack) they were built with, so
:class:`~tledge_runtime.model.engine_target.EngineTarget` records all three (:func:`target_here`: for an engine
built here).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from tledge_runtime.errors import BackendError
from tledge_runtime.model.engine_target import EngineTarget

_NO_TRT_HINT = ("on Jetson use the TensorRT that JetPack ships (python3-libnvinfer); elsewhere pip install tensorrt "
                "cuda-python; or run the .onnx export instead")
L4T_RELEASE_FILE = Path("/etc/nv_tegra_release")  # "# R36 (release), REVISION: 3.0, ..." on a Jetson


def import_cudart() -> Any:
    """The CUDA runtime bindings of cuda-python (new and old module paths)."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # cuda-python < 12.6
        except ImportError:
            raise BackendError("cuda-python is not installed (TensorRT engines need it for GPU memory)",
                               hint="pip install cuda-python") from None
    return cudart


def cuda_device_count() -> Optional[int]:
    """Number of CUDA GPUs the driver reports; 0 without a driver; None when cuda-python is absent (unknown)."""
    try:
        cudart = import_cudart()
    except BackendError:
        return None
    err, count = cudart.cudaGetDeviceCount()
    return int(count) if err == cudart.cudaError_t.cudaSuccess else 0


def compute_capability(device: int = 0) -> Optional[str]:
    """``"8.7"`` for the GPU at ``device``, or None when no GPU (or no cuda-python) is there."""
    if not cuda_device_count():
        return None
    cudart = import_cudart()
    err, props = cudart.cudaGetDeviceProperties(device)
    if err != cudart.cudaError_t.cudaSuccess:
        return None
    return f"{props.major}.{props.minor}"


def l4t_release(path: Path = L4T_RELEASE_FILE) -> str:
    """The Jetson Linux (L4T) release, e.g. ``"36.3.0"`` (JetPack 6.0), or "" off a Jetson."""
    try:
        text = path.read_text(errors="replace")[:4096]
    except OSError:
        return ""
    head = text.split(",")
    major = head[0].strip().lstrip("#").strip().split(" ")[0].lstrip("R") if head else ""
    revision = next((p.split(":")[1].strip() for p in head if "REVISION" in p and ":" in p), "")
    return f"{major}.{revision}" if major.isdigit() and revision else ""


@dataclass(frozen=True)
class TensorRT:
    """An importable TensorRT: the module and which flavour it is."""

    module: Any
    flavour: str  # "tensorrt" | "tensorrt-rtx"

    @property
    def version(self) -> str:
        return str(getattr(self.module, "__version__", "?"))

    def describe(self) -> str:
        return f"{'TensorRT' if self.flavour == 'tensorrt' else 'TensorRT for RTX'} {self.version}"


def find_tensorrt() -> Optional[TensorRT]:
    """The TensorRT installed here, full TensorRT first; None when neither imports."""
    for name, flavour in (("tensorrt", "tensorrt"), ("tensorrt_rtx_bindings", "tensorrt-rtx")):
        if importlib.util.find_spec(name) is None:
            continue
        try:
            return TensorRT(importlib.import_module(name), flavour)
        except ImportError:  # a registry stub without its libraries
            continue
    return None


def import_tensorrt() -> TensorRT:
    """:func:`find_tensorrt`, or a BackendError that says what to install."""
    trt = find_tensorrt()
    if trt is None:
        raise BackendError("TensorRT is not installed", hint=_NO_TRT_HINT)
    return trt


def target_here(trt: TensorRT) -> EngineTarget:
    """What an engine built now, with ``trt`` on this machine's GPU, is built for."""
    return EngineTarget(trt.version, trt.flavour, compute_capability() or "", l4t_release())
