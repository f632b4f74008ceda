"""Inference backends behind one small interface, and the choice between them.

A :class:`Backend` holds one loaded model on one engine and turns a batch (the
graph's input tensor) into the graph's output (logits or probabilities):

- ``ort-cpu``, ``ort-cuda``, ``ort-tensorrt``: ONNX Runtime with the CPU, CUDA or
  TensorRT execution provider (the last two need ``onnxruntime-gpu`` and a GPU);
- ``tensorrt``: a tledge ``.engine`` file run by TensorRT itself (:mod:`tledge_runtime.backends.trt`);
- ``openvino``: the ONNX file compiled by OpenVINO for the CPU (:mod:`tledge_runtime.backends.ov`).

:func:`open_backend` reads the model's metadata, picks a backend (``device="auto"``:
an engine file -> ``tensorrt``; an ONNX file -> ``ort-tensorrt`` if usable, else
``ort-cuda``, else ``ort-cpu``), checks the graph against the metadata and logs its
choice in one line. onnxruntime, openvino and tensorrt are imported only here, only
when a model is opened, so ``import tledge_runtime`` stays fast.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from importlib import metadata as importlib_metadata
from pathlib import Path

import numpy as np

from tledge_runtime.backends.base import Backend, BackendInfo, Opened, Shape
from tledge_runtime.backends.engine_file import is_engine_file, read_engine, read_engine_meta
from tledge_runtime.backends.nvidia import cuda_device_count
from tledge_runtime.backends.ort import (  # noqa: F401
    _ORT_PROVIDER,
    _PIP_GPU_HINT,
    import_onnxruntime,
    meta_from_props,
    meta_from_session,
    open_onnxruntime,
    ort_session,
)
from tledge_runtime.errors import BackendError, ModelError
from tledge_runtime.model.export_report import why_absent
from tledge_runtime.model.meta import ModelMeta

log = logging.getLogger("tledge_runtime")

BACKENDS = ("ort-tensorrt", "ort-cuda", "ort-cpu", "tensorrt", "openvino", "openvino-bf16")
DEVICES = ("auto", "cpu", "gpu")
_DEVICE_ALIASES = {"cuda": "gpu"}


# --------------------------------------------------------------------------- choice


def open_backend(path: str | os.PathLike, *, device: str = "auto", backend: str | None = None,
                 threads: int | None = None) -> Opened:
    """Load the model at ``path`` on the best (or the requested) backend and check it against its metadata."""
    path = Path(path)
    if not path.exists():
        refused = why_absent(path)
        if refused:
            raise ModelError(f"{path}: no such model file; {refused}",
                             hint=f"see {path.parent / 'report.json'} for what to try, or use a format it wrote")
        raise ModelError(f"{path}: no such model file", hint="check the path")
    if not path.is_file():
        raise ModelError(f"{path}: is not a file", hint="pass the .onnx or .engine file that `tledge export` wrote")
    device = _normalize_device(device)
    if backend is not None and backend not in BACKENDS:
        raise BackendError(f"unknown backend {backend!r}", hint=f"use one of {', '.join(BACKENDS)}, or leave it out")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise BackendError(f"threads must be a positive integer, got {threads!r}",
                           hint="leave it out to use every core")

    if is_engine_file(path):
        opened = _open_engine(path, device, backend)
    elif backend == "tensorrt":
        raise BackendError(f"{path}: backend 'tensorrt' runs tledge .engine files, this is not one",
                           hint="pass the .engine file, or use backend='ort-tensorrt' "
                                "to run the ONNX file through TensorRT")
    elif backend in ("openvino", "openvino-bf16"):
        opened = _open_openvino(path, device, threads, bf16=backend == "openvino-bf16")
    elif backend is None and device == "auto" and not _gpu_provider_usable():
        opened = _open_auto_cpu(path, threads)
    else:
        opened = open_onnxruntime(path, device, backend, threads)
    try:
        check_io(opened.meta, opened.backend, path)
    except BaseException:
        opened.backend.close()
        raise
    log.info("%s: backend %s (%s)", path.name, opened.backend.name, opened.reason)
    return opened


def _normalize_device(device: str) -> str:
    d = _DEVICE_ALIASES.get(str(device).lower(), str(device).lower())
    if d not in DEVICES:
        raise BackendError(f"unknown device {device!r}", hint="use 'auto', 'cpu' or 'gpu'")
    return d


def _open_engine(path: Path, device: str, backend: str | None) -> Opened:
    if backend not in (None, "tensorrt"):
        raise BackendError(f"{path}: a TensorRT engine file runs only on backend 'tensorrt', not {backend!r}",
                           hint=f"use the .onnx export with backend {backend!r}")
    if device == "cpu":
        raise BackendError(f"{path}: a TensorRT engine needs an NVIDIA GPU, device='cpu' was asked for",
                           hint="use the .onnx export on a CPU")
    meta, plan = read_engine(path)
    from tledge_runtime.backends.trt import TensorRTBackend  # tensorrt and cuda-python are imported inside

    return Opened(TensorRTBackend(plan, meta, path), meta, "engine file: native TensorRT")


def _open_openvino(path: Path, device: str, threads: int | None, *, bf16: bool) -> Opened:
    if device == "gpu":
        raise BackendError("backend 'openvino' runs on the CPU here, device='gpu' was asked for",
                           hint="use device='cpu', or backend='ort-cuda' for an NVIDIA GPU")
    meta = read_meta(path)  # onnxruntime reads the metadata; OpenVINO drops ONNX metadata_props
    from tledge_runtime.backends.ov import OpenVinoBackend  # openvino is imported inside

    backend = OpenVinoBackend(path, meta, threads, precision="bf16" if bf16 else "f32")
    return Opened(backend, meta, f"requested: OpenVINO on the CPU, {backend.precision} inference precision")


def _gpu_provider_usable() -> bool:
    """An ONNX Runtime GPU provider is present and a GPU is visible (cheap: no model is loaded)."""
    providers = set(import_onnxruntime().get_available_providers())
    has_gpu_ep = bool({_ORT_PROVIDER["ort-cuda"], _ORT_PROVIDER["ort-tensorrt"]} & providers)
    return has_gpu_ep and cuda_device_count() != 0


def _open_auto_cpu(path: Path, threads: int | None) -> Opened:
    """``device="auto"`` without a usable GPU: the CPU backend measured fastest for this model here (cached)."""
    from tledge_runtime.backends.auto import choose_cpu_backend

    usable = {"ort-cpu"} | ({"openvino"} if importlib.util.find_spec("openvino") else set())
    name, reason = choose_cpu_backend(path, usable, threads,
                                      lambda b: open_backend(path, device="cpu", backend=b, threads=threads))
    if name == "openvino":
        opened = _open_openvino(path, "auto", threads, bf16=False)
    else:
        opened = open_onnxruntime(path, "cpu", "ort-cpu", threads)
    return Opened(opened.backend, opened.meta, reason)


def read_meta(path: str | os.PathLike) -> ModelMeta:
    """The metadata of a model file (ONNX or tledge engine) without preparing it to run."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: no such model file", hint="check the path")
    if is_engine_file(path):
        return read_engine_meta(path)  # the header only: an engine file may be gigabytes
    return meta_from_session(ort_session(path, threads=1, optimize=False), path)


def backends_for(path: str | os.PathLike) -> list[str]:
    """The backends that can run the file at ``path`` on this machine (``check --backend all``)."""
    if is_engine_file(Path(path)):
        return ["tensorrt"]
    usable = {b.name for b in available_backends() if b.available}
    return [name for name in BACKENDS if name in usable and name != "tensorrt"]


# --------------------------------------------------------------------------- checks


def check_io(meta: ModelMeta, backend: Backend, path: str | os.PathLike) -> None:
    """Refuse a graph whose input or output contradicts its metadata (ModelError)."""
    def fail(what: str) -> None:
        raise ModelError(f"{path}: {what}",
                         hint="the metadata does not describe this graph; re-export it with `tledge export`")

    spec, p = meta.input, meta.preprocess
    if backend.input_name != spec.name:
        fail(f"graph input is named {backend.input_name!r}, the metadata says {spec.name!r}")
    shape = backend.input_shape
    if len(shape) != 4:
        fail(f"graph input has shape {_fmt(shape)}, expected rank 4 ({spec.layout})")
    n, c, h, w = shape if spec.layout == "NCHW" else (shape[0], shape[3], shape[1], shape[2])
    if c not in (None, 3):
        fail(f"graph input has {c} channels in {spec.layout} layout, expected 3")
    if (h not in (None, p.height)) or (w not in (None, p.width)):
        fail(f"graph input is {h}x{w}, the metadata's preprocessing makes {p.height}x{p.width}")
    if n is not None and spec.batch is not None and n != spec.batch:
        fail(f"graph input has batch {n}, the metadata says {spec.batch}")
    baked_graph = backend.input_dtype == np.uint8
    if baked_graph != (spec.dtype == "uint8"):
        fail(f"graph input is {backend.input_dtype}, the metadata says {spec.dtype}")
    # float16 vs float32 is not refused: the graph's own input type is what gets fed.
    out = backend.output_shape
    if len(out) != 2:
        fail(f"graph output {backend.output_name!r} has shape {_fmt(out)}, expected (batch, classes)")
    if out[1] is not None and out[1] != meta.num_classes:
        fail(f"graph output has {out[1]} classes, the metadata lists {meta.num_classes} labels")


def _fmt(shape: Shape) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"


# --------------------------------------------------------------------------- what is installed


def available_backends() -> list[BackendInfo]:
    """Each backend and whether it can run here, with the reason or the install command."""
    infos = []
    gpus = cuda_device_count()
    gpu_note = {0: "no CUDA GPU visible", None: "GPU unknown (cuda-python absent)"}.get(gpus, f"{gpus} CUDA GPU(s)")
    try:
        ort = import_onnxruntime()
        providers = set(ort.get_available_providers())
        for name in ("ort-tensorrt", "ort-cuda", "ort-cpu"):
            present = _ORT_PROVIDER[name] in providers
            usable = present and (name == "ort-cpu" or gpus != 0)
            detail = (f"onnxruntime {ort.__version__}" + ("" if name == "ort-cpu" else f", {gpu_note}") if present
                      else f"onnxruntime {ort.__version__} has no {_ORT_PROVIDER[name]}: {_PIP_GPU_HINT}")
            infos.append(BackendInfo(name, usable, detail))
    except BackendError as e:
        infos.extend(BackendInfo(n, False, str(e)) for n in ("ort-tensorrt", "ort-cuda", "ort-cpu"))
    # find_spec, not import: TensorRT's libraries take seconds to load, `info` only says whether they are there.
    trt = next((m for m in ("tensorrt", "tensorrt_rtx_bindings") if importlib.util.find_spec(m)), None)
    if trt is None:
        infos.append(BackendInfo("tensorrt", False, "TensorRT not installed: pip install tensorrt cuda-python "
                                                    "(on Jetson: the TensorRT that JetPack ships)"))
    elif gpus is None:
        infos.append(BackendInfo("tensorrt", False,
                                 f"{trt} {_version(trt)} present, cuda-python missing: pip install cuda-python"))
    else:
        infos.append(BackendInfo("tensorrt", gpus > 0, f"{trt} {_version(trt)}, {gpu_note}"))
    infos += _openvino_infos()
    return infos


def _openvino_infos() -> list[BackendInfo]:
    if not importlib.util.find_spec("openvino"):
        return [BackendInfo(n, False, "not installed: pip install openvino") for n in ("openvino", "openvino-bf16")]
    from tledge_runtime.backends.ov import cpu_supports_bf16

    version = _version("openvino")
    bf16 = cpu_supports_bf16()
    return [BackendInfo("openvino", True, f"openvino {version} (CPU, f32 inference precision)"),
            BackendInfo("openvino-bf16", bf16, f"openvino {version} (CPU, bfloat16: faster, not fp32; checked by "
                                               "`tledge-runtime check`)" if bf16 else "this CPU has no bfloat16")]


def _version(module: str) -> str:
    dist = {"tensorrt_rtx_bindings": "tensorrt_rtx_cu13_bindings"}.get(module, module)
    try:
        return importlib_metadata.version(dist)
    except importlib_metadata.PackageNotFoundError:
        return "(version unknown)"
